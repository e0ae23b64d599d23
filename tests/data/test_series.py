"""statsmodels series (no download), windows, train-only normalization, synthetic sequences."""

import socket

import numpy as np
import pytest

from dlmodels.data import series
from dlmodels.errors import UserError


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dlmodels.data.series tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_series_load_from_the_installed_package(no_network):
    sun = series.load_series("sunspots")
    assert sun.shape == (309, 1) and sun.dtype == np.float32
    assert sun[0, 0] == pytest.approx(5.0) and sun[-1, 0] == pytest.approx(2.9)
    co2 = series.load_series("co2")
    assert co2.shape == (526, 1) and np.all(np.isfinite(co2))
    assert 310 < co2[0, 0] < 320 and 365 < co2[-1, 0] < 375  # 1958 and 2001 ppm


def test_unknown_series():
    with pytest.raises(ValueError, match="`name`='airline' is not supported"):
        series.load_series("airline")


def test_windows_align_inputs_and_targets_and_match_tf_data():
    values = np.arange(10, dtype=np.float32)[:, None]
    x, y = series.make_windows(values, 3, 2)
    assert x.shape == (6, 3, 1) and y.shape == (6, 2, 1)
    np.testing.assert_array_equal(x[0, :, 0], [0, 1, 2])
    np.testing.assert_array_equal(y[0, :, 0], [3, 4])
    np.testing.assert_array_equal(y[-1, :, 0], [8, 9])
    tf_pairs = list(series.tf_windows(values, 3, 2).as_numpy_iterator())
    np.testing.assert_array_equal(np.stack([p[0] for p in tf_pairs]), x)
    np.testing.assert_array_equal(np.stack([p[1] for p in tf_pairs]), y)
    _, y_late = series.make_windows(values, 3, 2, start=7)
    np.testing.assert_array_equal(y_late[:, 0, 0], [7, 8])


def test_held_out_tail_and_train_only_normalization():
    data = series.forecasting_data("co2", window=24, horizon=3, test_size=60, val_size=40)
    n = len(data.series)
    assert data.val_end == n - 60 and data.train_end == n - 100
    train = data.series[: data.train_end]
    np.testing.assert_allclose(data.mean, train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(data.std, train.std(0) + 1e-6, rtol=1e-5)
    # CO2 rises: the tail normalized with train statistics sits well above 0.
    assert data.normalize(data.series[data.val_end :]).mean() > 1.0
    # Test targets are exactly the tail, each step once as the first horizon step.
    np.testing.assert_allclose(data.y_test_raw[:, 0], data.series[data.val_end : n - 2], rtol=1e-5)
    # No training or validation target reaches into the tail.
    last_train_target = data.y_train[-1, -1] * data.std + data.mean
    np.testing.assert_allclose(last_train_target, data.series[data.train_end - 1], rtol=1e-5)
    assert len(data.x_val) == 40 - 3 + 1
    batch = next(iter(data.train_dataset(batch_size=8)))
    assert tuple(batch[0].shape) == (8, 24, 1) and tuple(batch[1].shape) == (8, 3, 1)


def test_seasonal_naive():
    x = np.arange(12, dtype=np.float32).reshape(1, 12, 1)  # values 0..11, season 4
    pred = series.seasonal_naive(x, season=4, horizon=6)
    np.testing.assert_array_equal(pred[0, :, 0], [8, 9, 10, 11, 8, 9])
    with pytest.raises(ValueError, match="window >= season"):
        series.seasonal_naive(x, season=13, horizon=1)


def test_synthetic_sequences_are_seeded_padded_and_balanced():
    x, y, lengths = series.synthetic_sequences(400, time=20, features=2, min_length=8, seed=3)
    assert x.shape == (400, 20, 2) and y.shape == (400,) and lengths.min() >= 8
    assert set(np.unique(y)) == {0, 1, 2, 3} and np.bincount(y).min() > 60
    for i in range(10):
        assert np.all(x[i, lengths[i] :] == 0) and np.all(np.abs(x[i, : lengths[i]]).sum(-1) > 0)
    x2, y2, _ = series.synthetic_sequences(400, time=20, features=2, min_length=8, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


def test_test_targets_are_the_raw_tail_not_a_float_round_trip():
    data = series.forecasting_data("sunspots", window=22, horizon=1, test_size=40, val_size=30)
    tail = np.asarray(data.series[data.val_end :], np.float32)
    np.testing.assert_array_equal(data.y_test_raw[:, 0], tail)


def test_synthetic_min_length_above_time_is_an_error():
    with pytest.raises(ValueError, match="min_length=25 exceeds time=20"):
        series.synthetic_sequences(10, time=20, min_length=25)
    _, _, lengths = series.synthetic_sequences(10, time=20, min_length=20)
    assert np.all(lengths == 20)


def _csv(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_column_is_read_exactly_and_sorted_by_date(tmp_path):
    # Newest first, as many exports are; a blank line and quoted, padded cells.
    path = _csv(
        tmp_path,
        'day,units,note\n2024-01-03,3.5,c\n\n2024-01-01, 1e2 ,"a, quoted"\n2024-01-02,-7,b\n',
    )
    values, dates = series.load_csv(path, "units", date_column="day")
    assert values.dtype == np.float32 and values.shape == (3, 1)
    np.testing.assert_array_equal(values[:, 0], [100.0, -7.0, 3.5])
    np.testing.assert_array_equal(
        dates, np.array(["2024-01-01", "2024-01-02", "2024-01-03"], "datetime64[D]")
    )
    plain, none = series.load_csv(path, "units")  # file order without a date column
    np.testing.assert_array_equal(plain[:, 0], [3.5, 100.0, -7.0])
    assert none is None
    semi = _csv(tmp_path, "t;x\n1;2\n2;4\n", "semi.csv")
    np.testing.assert_array_equal(series.load_csv(semi, "x", delimiter=";")[0][:, 0], [2, 4])


@pytest.mark.parametrize(
    "text, kwargs, match",
    [
        ("a,b\n1,2\n", {"column": "c"}, r"no column 'c'; its columns are 'a', 'b'"),
        ("Units\n1\n2\n", {"column": "units"}, r"no column 'units' \(did you mean 'Units'\?\)"),
        ("a,b\n1,2\n3,x\n", {"column": "b"}, r"line 3: column 'b' holds 'x', not a finite"),
        ("a,b\n1,2\n3,\n", {"column": "b"}, r"line 3: column 'b' holds '', not a finite"),
        ("a,b\n1,2\n3,nan\n", {"column": "b"}, r"line 3: column 'b' holds 'nan'"),
        ("a,b\n1,2\n3\n", {"column": "b"}, r"line 3 has 1 fields, the header 2"),
        (
            "d,v\n2024-01-01,1\n01/02/2024,2\n",
            {"column": "v", "date_column": "d"},
            r"line 3: column 'd' holds '01/02/2024', not an ISO 8601 date",
        ),
        (
            "d,v\n2024-01-02,1\n2024-01-01,2\n2024-01-02,3\n",
            {"column": "v", "date_column": "d"},
            r"lines 2 and 4 have the same date 2024-01-02",
        ),
        ("a\n1\n", {"column": "a"}, r"has 1 value rows; a series needs >= 2"),
        ("", {"column": "a"}, r"is empty"),
    ],
)
def test_csv_errors_name_the_column_line_and_value(tmp_path, text, kwargs, match):
    path = _csv(tmp_path, text)
    with pytest.raises(UserError, match=match):
        series.load_csv(path, **kwargs)


def test_forecasting_data_from_csv_windows_the_column(tmp_path):
    t = np.arange(120)
    values = (10 + t % 7 + 0.5 * t).astype(np.float32)  # weekly cycle on a trend
    dates = np.datetime64("2024-01-01") + t
    lines = [f"{d},{v!r}" for d, v in zip(dates[::-1], values[::-1].tolist(), strict=True)]
    path = _csv(tmp_path, "date,sales\n" + "\n".join(lines) + "\n")
    data = series.forecasting_data_from_csv(
        path,
        "sales",
        date_column="date",
        season=7,
        window=14,
        horizon=2,
        test_size=20,
        val_size=10,
    )
    assert data.name == "sales" and data.season == 7 and data.dates[0] == dates[0]
    np.testing.assert_array_equal(data.series[:, 0], values)
    assert data.val_end == 100 and data.train_end == 90
    np.testing.assert_allclose(data.mean, values[:90].mean(), rtol=1e-6)
    # Test targets are the raw tail; the seasonal-naive forecast repeats last week's value.
    np.testing.assert_array_equal(data.y_test_raw[:, 0, 0], values[100:119])
    np.testing.assert_allclose(data.seasonal_naive_test()[:, 0, 0], values[93:112], rtol=1e-5)
    same = series.forecasting_data(
        "sales", values=values, season=7, window=14, horizon=2, test_size=20, val_size=10
    )
    np.testing.assert_array_equal(same.x_train, data.x_train)
    with pytest.raises(UserError, match=r"has 120 steps: too short .* needs at least 147"):
        series.forecasting_data_from_csv(path, "sales", window=14, horizon=2, test_size=100)
    with pytest.raises(UserError, match=r"load_csv: .* is not a file"):
        series.forecasting_data_from_csv(tmp_path / "missing.csv", "sales")
