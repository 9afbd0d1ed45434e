import pytest

from lowbit.algorithms.mixed_precision import LayerSensitivity, choose_primary


def test_ratio_counts_parameters_not_layers():
    layers = [LayerSensitivity("big", 800, 0.1), LayerSensitivity("a", 100, 0.2), LayerSensitivity("b", 100, 0.3)]
    assert choose_primary(layers, 0.8) == {"big"}
    assert choose_primary(layers, 0.9) == {"big", "a"}
    assert choose_primary(layers, 1.0) == {"big", "a", "b"}
    assert choose_primary(layers, 0.0) == set()


def test_the_most_sensitive_layers_keep_the_backup_precision():
    layers = [LayerSensitivity(f"l{i}", 100, s) for i, s in enumerate([0.5, 0.1, 0.9, 0.3])]
    assert choose_primary(layers, 0.5) == {"l1", "l3"}


def test_ratio_outside_zero_one_is_refused():
    with pytest.raises(ValueError):
        choose_primary([LayerSensitivity("a", 1, 0.0)], 1.5)
