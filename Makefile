# Two commands take a fresh machine to a tuned recipe and a green test run; both set themselves up.
.PHONY: demo test bootstrap

bootstrap:
	bash .ci/bootstrap.sh

demo: bootstrap  ## a real search on the embedded default: digits, SQLite study, local MLflow store
	.venv/bin/kfac-tune search examples/digits_mlp.yaml -o recipes/digits_mlp.yaml

test: bootstrap  ## the whole test suite, CPU only
	.venv/bin/python -m pytest -q
