"""Recurrent sequence models: a sequence classifier, a many-to-one / many-to-many forecaster and
an encoder-decoder (seq2seq) forecaster.

The classifier and the forecaster stack LSTM (Hochreiter & Schmidhuber 1997) or GRU (Cho et al.
2014) layers, optionally bidirectional (Schuster & Paliwal 1997), with dropout and recurrent
dropout (Gal & Ghahramani 2016: one mask per sequence) and masking for variable-length,
zero-padded sequences.

They use the built-in `keras.layers.LSTM` / `keras.layers.GRU` (cuDNN kernels on GPU when
`recurrent_dropout` is 0 and the activations are the defaults; native ONNX GRU / LSTM nodes
with `dlmodels.export.onnx_rnn.to_onnx_native_rnn`) and switch to `dlmodels.layers.LSTMCell` inside
`keras.layers.RNN` only for the options the built-ins lack: `peepholes` (Gers et al. 2000) and
`layer_norm` (Ba et al. 2016). Those run the generic RNN loop (no cuDNN); peephole LSTMs still
export to the native ONNX LSTM op (its P input), layer-normalized ones export as an ONNX Loop.

Outputs are float32 also under mixed precision: the classifier returns logits ("logits",
[batch, num_classes]), the forecaster raw values in the units of its targets ("forecast",
[batch, horizon, output_features] or [batch, time, output_features]).
"""

from __future__ import annotations

import keras

from dlmodels._validation import check_choice, check_positive_int
from dlmodels.layers.recurrent import LastStep, LSTMCell, SequenceCheck
from dlmodels.models.registry import register

CELLS = ("gru", "lstm")
FORECAST_MODES = ("many_to_one", "many_to_many")


def _units_tuple(units, owner) -> tuple[int, ...]:
    values = (units,) if isinstance(units, int) and not isinstance(units, bool) else units
    try:
        values = tuple(values)
    except TypeError:
        values = ()
    if not values:
        raise ValueError(
            f"{owner}: `units` must be a positive int or a non-empty sequence of them (one per "
            f"stacked layer), got {units!r}. Pass e.g. units=64 or units=(64, 32)."
        )
    return tuple(check_positive_int("units", u, owner=owner) for u in values)


def _rate(name, value, owner) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: `{name}` must be a float in [0, 1), got {value!r}.")
    return float(value)


def _check_sequence_shape(input_shape, owner, *, tokens=False) -> tuple:
    """(time, features) (or (time,) for token inputs): rank and sizes checked."""
    shape = tuple(input_shape)
    want = 1 if tokens else 2
    what = "(time,) for token ids" if tokens else "(time, features)"
    if len(shape) != want:
        raise ValueError(
            f"{owner}: `input_shape`={shape} must be {what}, without the batch axis: recurrent "
            "layers take [batch, time, features]. Reshape the data (e.g. a univariate series "
            "to (time, 1))."
        )
    time = shape[0]
    if time is not None and (not isinstance(time, int) or time < 1):
        raise ValueError(
            f"{owner}: `input_shape`={shape} has {time} time steps; sequences need at least "
            "one step (None for any length)."
        )
    if not tokens and (shape[1] is None or shape[1] < 1):
        raise ValueError(f"{owner}: `input_shape`={shape} needs a known number of features >= 1.")
    return shape


def _recurrent(
    cell,
    units,
    *,
    return_sequences,
    dropout,
    recurrent_dropout,
    peepholes,
    layer_norm,
    reset_after,
    name,
):
    if cell == "gru":
        if peepholes or layer_norm:
            raise ValueError(
                "`peepholes` / `layer_norm` are LSTM options (Gers et al. 2000; Ba et al. 2016); "
                "use cell='lstm' or turn them off."
            )
        return keras.layers.GRU(
            units,
            return_sequences=return_sequences,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            reset_after=reset_after,
            name=name,
        )
    if peepholes or layer_norm:
        return keras.layers.RNN(
            LSTMCell(
                units,
                peepholes=peepholes,
                layer_norm=layer_norm,
                dropout=dropout,
                recurrent_dropout=recurrent_dropout,
            ),
            return_sequences=return_sequences,
            name=name,
        )
    return keras.layers.LSTM(
        units,
        return_sequences=return_sequences,
        dropout=dropout,
        recurrent_dropout=recurrent_dropout,
        name=name,
    )


def _stack(
    x,
    *,
    owner,
    cell,
    units,
    bidirectional,
    dropout,
    recurrent_dropout,
    peepholes,
    layer_norm,
    reset_after,
    last_returns_sequences,
):
    cell = check_choice("cell", cell, CELLS, owner=owner)
    units = _units_tuple(units, owner)
    dropout = _rate("dropout", dropout, owner)
    recurrent_dropout = _rate("recurrent_dropout", recurrent_dropout, owner)
    for i, u in enumerate(units, start=1):
        seqs = last_returns_sequences or i < len(units)
        layer = _recurrent(
            cell,
            u,
            return_sequences=seqs,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            peepholes=peepholes,
            layer_norm=layer_norm,
            reset_after=reset_after,
            name=f"{cell}{i}",
        )
        if bidirectional:
            layer = keras.layers.Bidirectional(layer, name=f"bi_{cell}{i}")
        x = layer(x)
    return x


@register(
    "sequence_classifier",
    task="sequence_classification",
    paper="Hochreiter & Schmidhuber 1997 (LSTM); Cho et al. 2014 (GRU)",
)
def SequenceClassifier(
    input_shape=(None, 8),
    num_classes=2,
    *,
    cell="gru",
    units=64,
    bidirectional=False,
    dropout=0.0,
    recurrent_dropout=0.0,
    head_dropout=0.0,
    masking=False,
    mask_value=0.0,
    vocab_size=None,
    embedding_dim=32,
    peepholes=False,
    layer_norm=False,
    reset_after=True,
    final_activation=None,
    name="sequence_classifier",
):
    """A stacked (bi)directional RNN reading a whole sequence, then a dense classifier.

    Args:
        input_shape: (time, features) for real-valued sequences, or (time,) when `vocab_size`
            is given (token ids); time may be None (any length).
        num_classes: output logits (>= 1).
        cell: "gru" or "lstm".
        units: units of the recurrent layer, or a sequence of them (one per stacked layer).
        bidirectional: wrap every recurrent layer in `Bidirectional` (concat).
        dropout / recurrent_dropout: on each layer's inputs / recurrent state (per-sequence masks;
            recurrent_dropout > 0 disables cuDNN).
        head_dropout: dropout before the classifier.
        masking: skip padded steps: steps whose features all equal `mask_value` (or token id 0
            with `vocab_size`) leave the state unchanged.
        mask_value: the padding value for `masking`.
        vocab_size: token inputs: an `Embedding(vocab_size, embedding_dim)` first.
        embedding_dim: embedding size for token inputs.
        peepholes / layer_norm: LSTM variants (need cell="lstm"; use dlmodels.layers.LSTMCell).
        reset_after: GRU convention (True: Keras/cuDNN default).
        final_activation: None for logits (default), or "softmax" / "sigmoid".
        name: model name.

    Returns:
        `keras.Model` from "sequence" to "logits" [batch, num_classes] (float32).
    """
    owner = "SequenceClassifier"
    tokens = vocab_size is not None
    shape = _check_sequence_shape(input_shape, owner, tokens=tokens)
    num_classes = check_positive_int("num_classes", num_classes, owner=owner)
    check_choice("final_activation", final_activation, (None, "softmax", "sigmoid"), owner=owner)
    head_dropout = _rate("head_dropout", head_dropout, owner)
    inputs = keras.Input(shape, dtype="int32" if tokens else "float32", name="sequence")
    checked = SequenceCheck(rank=2 if tokens else 3, name="check_sequence")(inputs)
    if tokens:
        vocab_size = check_positive_int("vocab_size", vocab_size, owner=owner)
        x = keras.layers.Embedding(
            vocab_size,
            check_positive_int("embedding_dim", embedding_dim, owner=owner),
            mask_zero=bool(masking),
            name="embedding",
        )(checked)
    elif masking:
        x = keras.layers.Masking(mask_value=float(mask_value), name="masking")(checked)
    else:
        x = checked
    x = _stack(
        x,
        owner=owner,
        cell=cell,
        units=units,
        bidirectional=bidirectional,
        dropout=dropout,
        recurrent_dropout=recurrent_dropout,
        peepholes=peepholes,
        layer_norm=layer_norm,
        reset_after=reset_after,
        last_returns_sequences=False,
    )
    if head_dropout:
        x = keras.layers.Dropout(head_dropout, name="head_dropout")(x)
    x = keras.layers.Dense(num_classes, name="classifier")(x)
    outputs = keras.layers.Activation(final_activation or "linear", dtype="float32", name="logits")(
        x
    )
    return keras.Model(inputs, outputs, name=name)


@register(
    "sequence_forecaster",
    task="forecasting",
    paper="Hochreiter & Schmidhuber 1997 (LSTM); Cho et al. 2014 (GRU)",
)
def SequenceForecaster(
    input_shape=(24, 1),
    horizon=1,
    *,
    output_features=None,
    mode="many_to_one",
    cell="gru",
    units=64,
    bidirectional=False,
    dropout=0.0,
    recurrent_dropout=0.0,
    masking=False,
    mask_value=0.0,
    peepholes=False,
    layer_norm=False,
    reset_after=True,
    name="sequence_forecaster",
):
    """A stacked RNN forecaster returning raw values (no activation).

    - "many_to_one": reads a window of `time` steps and predicts the next `horizon` steps at
      once (direct multi-step): "forecast" [batch, horizon, output_features].
    - "many_to_many": predicts the next step at every step (sequence-to-sequence of equal
      length, trained with the target shifted by one): "forecast" [batch, time,
      output_features]. It must be causal, so it refuses `bidirectional` (the backward direction
      would see the values it is asked to predict) and `horizon` != 1.

    Args:
        input_shape: (time, features); time may be None for many_to_many or masked inputs.
        horizon: steps predicted by many_to_one (>= 1).
        output_features: predicted features per step (default: all input features).
        mode: "many_to_one" or "many_to_many".
        cell / units / bidirectional / dropout / recurrent_dropout / peepholes / layer_norm /
            reset_after: as in `SequenceClassifier`.
        masking: skip steps whose features all equal `mask_value` (variable-length windows).
        mask_value: padding value for `masking`.
        name: model name.

    Returns:
        `keras.Model` from "series" to "forecast" (float32).
    """
    owner = "SequenceForecaster"
    mode = check_choice("mode", mode, FORECAST_MODES, owner=owner)
    shape = _check_sequence_shape(input_shape, owner)
    horizon = check_positive_int("horizon", horizon, owner=owner)
    out_features = check_positive_int(
        "output_features", shape[1] if output_features is None else output_features, owner=owner
    )
    if mode == "many_to_many":
        if bidirectional:
            raise ValueError(
                f"{owner}: mode='many_to_many' with bidirectional=True is not causal: the "
                "backward direction reads the future values each step is asked to predict. Use "
                "bidirectional=False, or mode='many_to_one'."
            )
        if horizon != 1:
            raise ValueError(
                f"{owner}: mode='many_to_many' predicts one step ahead at every step; got "
                f"`horizon`={horizon}. Use mode='many_to_one' for multi-step forecasts."
            )
    inputs = keras.Input(shape, name="series")
    x = SequenceCheck(name="check_sequence")(inputs)
    if masking:
        x = keras.layers.Masking(mask_value=float(mask_value), name="masking")(x)
    x = _stack(
        x,
        owner=owner,
        cell=cell,
        units=units,
        bidirectional=bidirectional,
        dropout=dropout,
        recurrent_dropout=recurrent_dropout,
        peepholes=peepholes,
        layer_norm=layer_norm,
        reset_after=reset_after,
        last_returns_sequences=mode == "many_to_many",
    )
    if mode == "many_to_one":
        x = keras.layers.Dense(horizon * out_features, name="head")(x)
        x = keras.layers.Reshape((horizon, out_features), name="to_horizon")(x)
    else:
        x = keras.layers.Dense(out_features, name="head")(x)
    outputs = keras.layers.Activation("linear", dtype="float32", name="forecast")(x)
    return keras.Model(inputs, outputs, name=name)


def _rnn_class(cell):
    return keras.layers.GRU if cell == "gru" else keras.layers.LSTM


@register(
    "seq2seq_forecaster",
    task="seq2seq_forecasting",
    paper="Sutskever et al. 2014 (sequence to sequence); Cho et al. 2014 (RNN encoder-decoder)",
)
def Seq2SeqForecaster(
    input_shape=(24, 1),
    horizon=12,
    *,
    output_features=None,
    cell="gru",
    units=64,
    dropout=0.0,
    recurrent_dropout=0.0,
    name="seq2seq_forecaster",
):
    """An RNN encoder-decoder forecaster (Cho et al. 2014; Sutskever et al. 2014), the training
    (teacher forcing) graph.

    The encoder reads the window and hands its final state to the decoder, which emits the
    `horizon` future steps one at a time, each from the previous step's value. In training the
    decoder is fed the true previous values ("decoder_inputs": the last observed value, then the
    targets shifted by one; `teacher_forcing_inputs` builds them); at inference it is fed its
    own predictions (`seq2seq_inference_model`, the same layers, one input). Train with
    `dlmodels.training.seq2seq.Seq2SeqTask`.

    Args:
        input_shape: (time, features) of the observed window.
        horizon: predicted steps (>= 1).
        output_features: predicted features, the first `output_features` input features
            (default: all).
        cell: "gru" or "lstm".
        units: state size of encoder and decoder.
        dropout / recurrent_dropout: on the recurrent layers' inputs / states.
        name: model name.

    Returns:
        `keras.Model` from {"series": [batch, time, features], "decoder_inputs": [batch,
        horizon, output_features]} to "forecast" [batch, horizon, output_features] (float32).
    """
    owner = "Seq2SeqForecaster"
    shape = _check_sequence_shape(input_shape, owner)
    horizon = check_positive_int("horizon", horizon, owner=owner)
    cell = check_choice("cell", cell, CELLS, owner=owner)
    units = check_positive_int("units", units, owner=owner)
    out_features = check_positive_int(
        "output_features", shape[1] if output_features is None else output_features, owner=owner
    )
    if out_features > shape[1]:
        raise ValueError(
            f"{owner}: `output_features`={out_features} exceeds the {shape[1]} input features; "
            "the forecast targets are the first `output_features` input features."
        )
    dropout = _rate("dropout", dropout, owner)
    recurrent_dropout = _rate("recurrent_dropout", recurrent_dropout, owner)
    rnn = _rnn_class(cell)
    series = keras.Input(shape, name="series")
    decoder_inputs = keras.Input((horizon, out_features), name="decoder_inputs")
    x = SequenceCheck(name="check_sequence")(series)
    _, *states = rnn(
        units,
        return_state=True,
        dropout=dropout,
        recurrent_dropout=recurrent_dropout,
        name="encoder",
    )(x)
    y, *_ = rnn(
        units,
        return_sequences=True,
        return_state=True,
        dropout=dropout,
        recurrent_dropout=recurrent_dropout,
        name="decoder",
    )(decoder_inputs, initial_state=states)
    y = keras.layers.Dense(out_features, name="head")(y)
    outputs = keras.layers.Activation("linear", dtype="float32", name="forecast")(y)
    return keras.Model({"series": series, "decoder_inputs": decoder_inputs}, outputs, name=name)


def teacher_forcing_inputs(series, targets):
    """The decoder inputs of teacher forcing: the last observed value of the target features,
    then the targets shifted by one step ([batch, horizon, output_features])."""
    from keras import ops

    features = targets.shape[-1]
    first = series[:, -1:, :features]
    return ops.concatenate([ops.cast(first, targets.dtype), targets[:, :-1]], axis=1)


def seq2seq_inference_model(model, *, name=None):
    """The autoregressive forecaster over the layers (and weights) of a `Seq2SeqForecaster`:
    "series" -> "forecast", each decoder step fed the previous prediction, unrolled for the
    horizon (a static graph: exports to ONNX with one native GRU / LSTM node per step).
    """
    try:
        encoder, decoder = model.get_layer("encoder"), model.get_layer("decoder")
        head = model.get_layer("head")
        check = model.get_layer("check_sequence")
    except ValueError as err:
        raise ValueError(
            f"{model.name!r} is not a Seq2SeqForecaster (no encoder/decoder/head layers)"
        ) from err
    series_in = model.get_layer("series").output
    horizon, out_features = model.get_layer("decoder_inputs").output.shape[1:]
    series = keras.Input(tuple(series_in.shape[1:]), name="series")
    _, *states = encoder(check(series))
    prev = LastStep(out_features, name="last_observed")(series)
    steps = []
    for _ in range(horizon):
        y, *states = decoder(prev, initial_state=states)
        prev = head(y)
        steps.append(prev)
    y = steps[0] if horizon == 1 else keras.layers.Concatenate(axis=1, name="steps")(steps)
    outputs = keras.layers.Activation("linear", dtype="float32", name="forecast")(y)
    return keras.Model(series, outputs, name=name or f"{model.name}_inference")
