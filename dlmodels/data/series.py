"""Time series: real series shipped with statsmodels, windowed for forecasting, and a synthetic
sequence-classification set.

Real data come from the statsmodels package itself (`statsmodels.datasets`, CSV files inside the
installed package): nothing is downloaded.

- "sunspots": yearly mean sunspot numbers 1700-2008 (309 values), a quasi-periodic ~11-year
  solar cycle; seasonal period 11.
- "co2": Mauna Loa atmospheric CO2 (ppm), weekly 1958-2001 averaged to monthly means (526
  values, gaps interpolated), trend + yearly cycle; seasonal period 12.

The last `test_size` values are the held-out tail. Normalization (mean / std) is fit on the
training part only, before any window is cut, so no statistic of the tail leaks into training.
Test windows take their inputs from anything before the predicted steps (known history, which
may reach into the training part) and their targets from the tail only.

    data = forecasting_data("sunspots", window=22, horizon=1, test_size=40)
    model.fit(data.train_dataset(batch_size=32), ...)
    mae = np.mean(np.abs(data.denormalize(model.predict(data.x_test)) - data.y_test_raw))

The user's own series comes from a CSV file with a header row: `load_csv(path, column,
date_column=...)` reads one numeric column (rows sorted by the date column when given), and
`forecasting_data_from_csv` windows it the same way:

    data = forecasting_data_from_csv("sales.csv", "units", date_column="day", season=7,
                                     window=28, horizon=7, test_size=56, val_size=28)
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import numpy as np

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.errors import UserError

SERIES = ("sunspots", "co2")
SEASON = {"sunspots": 11, "co2": 12}
"""Seasonal period of each series, in its own steps (the seasonal-naive baseline's lag)."""


def load_series(name: str) -> np.ndarray:
    """The raw series as float32 [time, 1], oldest first, from the installed statsmodels."""
    check_choice("name", name, SERIES, owner="load_series")
    try:
        from statsmodels import datasets
    except ImportError as err:  # pragma: no cover - statsmodels is in the tf/dev extras
        raise ImportError(
            "dlmodels.data.series needs statsmodels: pip install 'dlmodels[tf]' or "
            "'statsmodels>=0.14,<0.16'"
        ) from err
    if name == "sunspots":
        values = datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    else:
        weekly = datasets.co2.load_pandas().data["co2"]
        values = weekly.resample("MS").mean().interpolate(limit_direction="both").to_numpy()
    values = np.asarray(values, dtype=np.float32)[:, None]
    if not np.all(np.isfinite(values)):
        raise ValueError(f"series {name!r} has non-finite values after loading")
    return values


def load_csv(
    path: str | os.PathLike,
    column: str,
    *,
    date_column: str | None = None,
    delimiter: str = ",",
):
    """One numeric column of a CSV file (with a header row) as a float32 series [time, 1].

    Blank lines are skipped. With `date_column` the dates (ISO 8601: 2024-03-01, 2024-03,
    2024-03-01T12:00) are parsed and the rows sorted by them, oldest first (files exported
    newest first are common); a date seen twice is an error. Without it the file order is the
    time order.

    Args:
        path: the CSV file.
        column: the header name of the values.
        date_column: the header name of the dates, or None.
        delimiter: the field separator ("," by default; ";" or a tab in some exports).

    Returns:
        `(values, dates)`: float32 [time, 1] and numpy datetime64 [time] (None without
        `date_column`).

    Raises:
        UserError: a missing file or column (the message lists the columns), a row with too few
            fields, an empty, non-numeric or non-finite value or an unparseable or repeated date
            (the message names the line and the value), fewer than 2 rows.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"load_csv: {path} is not a file" + (" (a folder)" if path.is_dir() else "")
        )
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            # line_num after a row is read is the file line it ended on (quoted fields may
            # span lines), which is what an error message should point to.
            rows = [(reader.line_num, row) for row in reader if row]
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"load_csv: cannot read {path} as CSV text: {err}") from err
    if not rows:
        raise UserError(f"load_csv: {path} is empty; expected a header row and values.")
    header = [name.strip() for name in rows[0][1]]
    wanted = {"column": column} | ({"date_column": date_column} if date_column else {})
    where = {}
    for arg, name in wanted.items():
        if name not in header:
            close = [h for h in header if h.lower() == str(name).lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"load_csv: {path} has no column {name!r}{hint}; its columns are "
                f"{', '.join(repr(h) for h in header)}. Pass one of them as `{arg}`."
            )
        where[arg] = header.index(name)
    values, dates = [], []
    for line, row in rows[1:]:
        if len(row) <= max(where.values()):
            raise UserError(
                f"load_csv: {path} line {line} has {len(row)} fields, the header {len(header)}; "
                f"no value for {column!r}" + (f" / {date_column!r}" if date_column else "") + "."
            )
        cell = row[where["column"]].strip()
        try:
            value = float(cell)
        except ValueError:
            value = None
        if value is None or not np.isfinite(value):
            raise UserError(
                f"load_csv: {path} line {line}: column {column!r} holds {cell!r}, not a finite "
                "number. Fill or drop that row (missing values are not interpolated)."
            )
        values.append(value)
        if date_column:
            text = row[where["date_column"]].strip()
            try:
                dates.append(np.datetime64(text))
            except ValueError:
                dates.append(None)
            if dates[-1] is None or np.isnat(dates[-1]):
                raise UserError(
                    f"load_csv: {path} line {line}: column {date_column!r} holds {text!r}, not "
                    "an ISO 8601 date (e.g. 2024-03-01 or 2024-03-01T12:00)."
                )
    if len(values) < 2:
        raise UserError(f"load_csv: {path} has {len(values)} value rows; a series needs >= 2.")
    series = np.asarray(values, np.float32)[:, None]
    if not date_column:
        return series, None
    stamps = np.asarray(dates, dtype="datetime64")
    order = np.argsort(stamps, kind="stable")
    stamps, series = stamps[order], series[order]
    repeated = np.flatnonzero(stamps[1:] == stamps[:-1])
    if len(repeated):
        lines = [rows[1:][order[i]][0] for i in (repeated[0], repeated[0] + 1)]
        raise UserError(
            f"load_csv: {path} lines {lines[0]} and {lines[1]} have the same date "
            f"{stamps[repeated[0]]} in {date_column!r}; keep one value per date."
        )
    return series, stamps


def make_windows(values: np.ndarray, window: int, horizon: int, *, start: int = 0):
    """(x [n, window, features], y [n, horizon, features]) for every target starting at >= start.

    Window i reads values[t - window : t] and predicts values[t : t + horizon] for
    t = max(start, window), ..., len(values) - horizon.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"values must be [time, features], got shape {values.shape}")
    window = check_positive_int("window", window, owner="make_windows")
    horizon = check_positive_int("horizon", horizon, owner="make_windows")
    first = max(int(start), window)
    last = len(values) - horizon
    if last < first:
        raise ValueError(
            f"a series of {len(values)} steps has no window of {window} inputs and {horizon} "
            f"targets starting at >= {first}; use a shorter window or horizon"
        )
    ts = np.arange(first, last + 1)
    x = np.stack([values[t - window : t] for t in ts])
    y = np.stack([values[t : t + horizon] for t in ts])
    return x, y


def seasonal_naive(x: np.ndarray, season: int, horizon: int) -> np.ndarray:
    """The seasonal-naive forecast for windows `x` [n, window, features]: step h of the horizon
    repeats the value one season earlier, y^_{t+h} = y_{t+h-season*k}, k = ceil((h+1)/season).
    Needs window >= season."""
    season = check_positive_int("season", season, owner="seasonal_naive")
    window = x.shape[1]
    if window < season:
        raise ValueError(f"seasonal_naive needs window >= season ({season}), got {window}")
    preds = []
    for h in range(horizon):
        k = -(-(h + 1) // season)
        preds.append(x[:, window + h - season * k])
    return np.stack(preds, axis=1)


@dataclasses.dataclass
class ForecastingData:
    """Normalized train / validation / test windows of one series.

    Attributes:
        name, season, window, horizon: what was built.
        mean, std: normalization statistics of the training part ([features]).
        x_train, y_train, x_val, y_val, x_test, y_test: normalized windows.
        y_test_raw: test targets in the series' own units.
        series: the raw series [time, features]; train_end / val_end: split indices (targets
            of train windows lie before train_end, of validation windows before val_end, of
            test windows at or after val_end).
        dates: datetime64 [time] of a CSV series read with a date column, else None.
    """

    name: str
    season: int
    window: int
    horizon: int
    mean: np.ndarray
    std: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    y_test_raw: np.ndarray
    series: np.ndarray
    train_end: int
    val_end: int
    dates: np.ndarray | None = None

    def normalize(self, values):
        return (np.asarray(values, np.float32) - self.mean) / self.std

    def denormalize(self, values):
        return np.asarray(values, np.float32) * self.std + self.mean

    def seasonal_naive_test(self) -> np.ndarray:
        """The seasonal-naive forecast of the test targets, in the series' units."""
        return self.denormalize(seasonal_naive(self.x_test, self.season, self.horizon))

    def train_dataset(self, batch_size=32, *, shuffle=True, seed=0):
        return windows_dataset(self.x_train, self.y_train, batch_size, shuffle=shuffle, seed=seed)

    def val_dataset(self, batch_size=32):
        return windows_dataset(self.x_val, self.y_val, batch_size, shuffle=False)

    def test_dataset(self, batch_size=32):
        return windows_dataset(self.x_test, self.y_test, batch_size, shuffle=False)


def forecasting_data(
    name: str = "sunspots",
    *,
    window: int = 22,
    horizon: int = 1,
    test_size: int = 40,
    val_size: int = 30,
    values: np.ndarray | None = None,
    season: int | None = None,
    dates: np.ndarray | None = None,
) -> ForecastingData:
    """Windows of a statsmodels series (or of `values`) with a held-out tail, normalized on the
    train part.

    Args:
        name: "sunspots" or "co2"; with `values`, only a label for the series.
        window: input steps per window.
        horizon: predicted steps per window.
        test_size: length of the held-out tail (steps whose values are test targets).
        val_size: steps before the tail whose values are validation targets.
        values: the series itself, [time] or [time, features] (e.g. from `load_csv`), instead
            of a named statsmodels series.
        season: seasonal period for the seasonal-naive baseline; default the named series'
            (`SEASON`), or 1 (the last value repeated) for `values`.
        dates: the dates of `values`, kept in `ForecastingData.dates`.

    Returns:
        A `ForecastingData`.
    """
    owner = "forecasting_data"
    if values is None:
        series = load_series(name)
        season = SEASON[name] if season is None else season
    else:
        series = np.asarray(values, np.float32)
        series = series[:, None] if series.ndim == 1 else series
        if series.ndim != 2 or not np.all(np.isfinite(series)):
            raise UserError(
                f"{owner}: `values` must be a finite [time] or [time, features] array, got shape "
                f"{np.shape(values)}" + ("" if series.ndim != 2 else " with non-finite values")
            )
        season = 1 if season is None else season
    season = check_positive_int("season", season, owner=owner)
    window = check_positive_int("window", window, owner=owner)
    horizon = check_positive_int("horizon", horizon, owner=owner)
    test_size = check_positive_int("test_size", test_size, owner=owner)
    val_size = check_positive_int("val_size", val_size, owner=owner)
    n = len(series)
    val_end = n - test_size
    train_end = val_end - val_size
    if train_end < window + horizon + 1:
        raise UserError(
            f"series {name!r} has {n} steps: too short for test_size={test_size}, "
            f"val_size={val_size} and window={window} (it needs at least "
            f"{test_size + val_size + window + horizon + 1}); lower them or use a longer series"
        )
    mean = series[:train_end].mean(axis=0)
    std = series[:train_end].std(axis=0) + 1e-6
    norm = (series - mean) / std

    def targets_before(x, y, end, start):
        # keep windows whose whole horizon lies in [start, end)
        first_target = np.arange(len(x)) + max(start, window)
        keep = first_target + horizon <= end
        return x[keep], y[keep]

    x_all, y_all = make_windows(norm, window, horizon)
    x_train, y_train = targets_before(x_all, y_all, train_end, 0)
    x_val, y_val = make_windows(norm[:val_end], window, horizon, start=train_end)
    x_test, y_test = make_windows(norm, window, horizon, start=val_end)
    _, y_test_raw = make_windows(series, window, horizon, start=val_end)  # the tail as stored
    return ForecastingData(
        name=name,
        season=season,
        window=window,
        horizon=horizon,
        mean=mean,
        std=std,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        y_test_raw=y_test_raw,
        series=series,
        train_end=train_end,
        val_end=val_end,
        dates=dates,
    )


def forecasting_data_from_csv(
    path: str | os.PathLike,
    column: str,
    *,
    date_column: str | None = None,
    delimiter: str = ",",
    season: int = 1,
    window: int = 22,
    horizon: int = 1,
    test_size: int = 40,
    val_size: int = 30,
) -> ForecastingData:
    """`load_csv` then `forecasting_data(values=...)`: windows of the user's own series, its last
    `test_size` steps held out, normalized on the train part. `season` is the period of the
    seasonal-naive baseline (7 for daily data with a weekly cycle, 12 for monthly; 1 = repeat
    the last value). The series is named after `column`."""
    values, dates = load_csv(path, column, date_column=date_column, delimiter=delimiter)
    return forecasting_data(
        column,
        window=window,
        horizon=horizon,
        test_size=test_size,
        val_size=val_size,
        values=values,
        season=season,
        dates=dates,
    )


def windows_dataset(x, y, batch_size=32, *, shuffle=False, seed=0, drop_remainder=False):
    """A `tf.data.Dataset` of (x, y) batches that shards by data under tf.distribute."""
    import tensorflow as tf

    batch_size = check_positive_int("batch_size", batch_size, owner="windows_dataset")
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def tf_windows(values, window: int, horizon: int):
    """The same windows as `make_windows`, cut by tf.data (`Dataset.window`), unbatched:
    a dataset of (x [window, features], y [horizon, features])."""
    import tensorflow as tf

    window = check_positive_int("window", window, owner="tf_windows")
    horizon = check_positive_int("horizon", horizon, owner="tf_windows")
    size = window + horizon
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(values, np.float32))
    ds = ds.window(size, shift=1, drop_remainder=True).flat_map(lambda w: w.batch(size))
    return ds.map(lambda w: (w[:window], w[window:]))


SYNTHETIC_CLASSES = ("sine_slow", "sine_fast", "chirp", "square")


def synthetic_sequences(
    num_samples: int = 512,
    *,
    time: int = 32,
    features: int = 2,
    min_length: int | None = None,
    noise: float = 0.3,
    seed: int = 0,
):
    """A seeded sequence-classification set: which waveform is hidden in the noise.

    Class 0: slow sine, 1: fast sine, 2: chirp (frequency rising over time), 3: square wave;
    random phase and amplitude per sample and feature, gaussian noise of std `noise`. With
    `min_length` each sequence has a random length in [min_length, time] and is zero-padded at
    the end (use masking).

    Returns:
        (x float32 [n, time, features], y int32 [n], lengths int32 [n]).
    """
    num_samples = check_positive_int("num_samples", num_samples, owner="synthetic_sequences")
    time = check_positive_int("time", time, owner="synthetic_sequences")
    features = check_positive_int("features", features, owner="synthetic_sequences")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(SYNTHETIC_CLASSES), num_samples).astype(np.int32)
    t = np.arange(time, dtype=np.float64)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, (num_samples, 1, features))
    amp = rng.uniform(0.7, 1.3, (num_samples, 1, features))
    slow = np.sin(2 * np.pi * t / 16.0 + phase)
    fast = np.sin(2 * np.pi * t / 4.0 + phase)
    chirp = np.sin(2 * np.pi * (t / 16.0 + t**2 / (8.0 * time)) + phase)  # frequency rising
    square = np.sign(np.sin(2 * np.pi * t / 8.0 + phase))
    waves = np.stack([slow, fast, chirp, square])  # [class, n, time, features]
    x = waves[y, np.arange(num_samples)] * amp + rng.normal(0, noise, (num_samples, time, features))
    lengths = np.full(num_samples, time, np.int32)
    if min_length is not None:
        min_length = check_positive_int("min_length", min_length, owner="synthetic_sequences")
        if min_length > time:
            raise ValueError(
                f"synthetic_sequences: min_length={min_length} exceeds time={time}; sequences "
                f"cannot be longer than the padded length. Pass min_length <= {time}."
            )
        lengths = rng.integers(min_length, time + 1, num_samples).astype(np.int32)
        x[np.arange(time)[None, :] >= lengths[:, None]] = 0.0
    return x.astype(np.float32), y, lengths
