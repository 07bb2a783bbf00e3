# Two commands take a fresh machine to a tuned recipe and a green test run; both set themselves up.
.PHONY: demo test check bootstrap
# the environment bootstrap made (KFAC_TUNE_VENV, else .venv)
PYTHON = $(or $(KFAC_TUNE_VENV),.venv)/bin/python

bootstrap:
	bash .ci/bootstrap.sh

demo: bootstrap  ## a real search on the embedded default: digits, SQLite study, local MLflow store
	.venv/bin/kfac-tune search examples/digits_mlp.yaml -o recipes/digits_mlp.yaml

test: bootstrap  ## the whole test suite, CPU only
	$(PYTHON) -m pytest -q

# The inner loop's tier, about a minute on 2 shared cores: K-FAC's curvature against exact autograd
# computations, its Gauss-Newton speed and host reads at the guards' defaults, config validation, the import
# layering, and one end-to-end search (search, show, export, train).
CHECK = tests/test_optim_exact.py tests/test_optim_layers.py tests/test_optim_coverage.py tests/test_config.py \
	tests/test_layering.py tests/test_search_e2e.py::test_search_show_export_train \
	tests/test_safe_and_fast.py::test_kfac_solves_ill_conditioned_least_squares_at_the_guards_defaults \
	tests/test_safe_and_fast.py::test_an_ordinary_step_reads_nothing_back_from_the_device
check: bootstrap  ## the fast tier: run it before each commit, `make test` before a merge
	$(PYTHON) -m pytest -q $(CHECK)
