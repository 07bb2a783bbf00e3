"""scikit-learn's bundled breast-cancer table, standardised on the training rows, as numpy arrays."""
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split


def load():
    x, y = load_breast_cancer(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    mean, std = train_x.mean(0), train_x.std(0)
    return ((train_x - mean) / std).astype("float32"), train_y, ((test_x - mean) / std).astype("float32"), test_y
