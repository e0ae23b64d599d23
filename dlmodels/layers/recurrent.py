"""Recurrent cells for `keras.layers.RNN`: LSTM (with peepholes and layer normalization) and GRU.

With their default options the cells compute exactly what `keras.layers.LSTM` /
`keras.layers.GRU` compute, with the same weight layout (`kernel`, `recurrent_kernel`, `bias`,
gates in Keras order), so `set_weights` moves weights between them in both directions. They
exist for the variants the built-in layers lack (peepholes, layer normalization) and as readable
reference implementations; models use the built-in layers (cuDNN on GPU, native ONNX export)
unless an option needs a cell.
"""

from __future__ import annotations

import keras
from keras import ops

# Keras' own variational-dropout mixin: keras.layers.RNN resets its masks once per sequence only
# for cells that inherit it (isinstance check in RNN.call), and there is no public alias in
# Keras 3. It is a private module: checked against Keras 3.x (setup.cfg bounds keras < 4), and
# tests/layers/test_recurrent.py::test_private_keras_dropout_mixin_is_still_there fails with this
# explanation if a Keras release moves it.
try:
    from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
except ImportError as _err:  # pragma: no cover - only on an incompatible Keras
    raise ImportError(
        f"dlmodels.layers.recurrent needs Keras' private DropoutRNNCell mixin "
        f"(keras.src.layers.rnn.dropout_rnn_cell), which Keras {keras.__version__} does not have. "
        "dlmodels supports Keras 3.x (< 4); pin keras to a 3.x release."
    ) from _err

from dlmodels._validation import check_positive_int


def _check_rate(name, value, owner):
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"{owner}: `{name}` must be a float in [0, 1), got {value!r}. Pass e.g. {name}=0.1."
        )
    return float(value)


def _check_step_input(input_shape, owner):
    """A cell is built on one time step, [batch, features]; a rank-3 shape here means the cell
    was called directly on a sequence instead of through keras.layers.RNN."""
    shape = tuple(input_shape)
    if len(shape) != 2 or shape[-1] is None:
        raise ValueError(
            f"{owner}: expected one time step of shape [batch, features] with known features, "
            f"got {shape}. Wrap the cell in keras.layers.RNN(cell) and feed it "
            "[batch, time, features] sequences."
        )
    return int(shape[-1])


def _init_cell(
    cell,
    owner,
    *,
    units,
    activation,
    recurrent_activation,
    use_bias,
    kernel_initializer,
    recurrent_initializer,
    bias_initializer,
    dropout,
    recurrent_dropout,
    seed,
):
    """The validation and attributes LSTMCell and GRUCell share."""
    cell.units = check_positive_int("units", units, owner=owner)
    cell.activation = keras.activations.get(activation)
    cell.recurrent_activation = keras.activations.get(recurrent_activation)
    cell.use_bias = bool(use_bias)
    cell.kernel_initializer = keras.initializers.get(kernel_initializer)
    cell.recurrent_initializer = keras.initializers.get(recurrent_initializer)
    cell.bias_initializer = keras.initializers.get(bias_initializer)
    cell.dropout = _check_rate("dropout", dropout, owner)
    cell.recurrent_dropout = _check_rate("recurrent_dropout", recurrent_dropout, owner)
    cell.seed = seed
    cell.seed_generator = keras.random.SeedGenerator(seed=seed)
    cell.output_size = cell.units


def _cell_config(cell) -> dict:
    """The config entries LSTMCell and GRUCell share."""
    return {
        "units": cell.units,
        "activation": keras.activations.serialize(cell.activation),
        "recurrent_activation": keras.activations.serialize(cell.recurrent_activation),
        "use_bias": cell.use_bias,
        "kernel_initializer": keras.initializers.serialize(cell.kernel_initializer),
        "recurrent_initializer": keras.initializers.serialize(cell.recurrent_initializer),
        "bias_initializer": keras.initializers.serialize(cell.bias_initializer),
        "dropout": cell.dropout,
        "recurrent_dropout": cell.recurrent_dropout,
        "seed": cell.seed,
    }


def _layer_norm(x, gamma, beta, epsilon):
    mean = ops.mean(x, axis=-1, keepdims=True)
    var = ops.var(x, axis=-1, keepdims=True)
    return (x - mean) * ops.rsqrt(var + epsilon) * gamma + beta


@keras.saving.register_keras_serializable(package="dlmodels")
class LSTMCell(keras.layers.Layer, DropoutRNNCell):
    """Long short-term memory cell (Hochreiter & Schmidhuber 1997, "Long Short-Term Memory",
    Neural Computation 9(8)), with the forget gate of Gers, Schmidhuber & Cummins 2000).

    One step, with [x_t, h_{t-1}] projected by `kernel` W and `recurrent_kernel` U (gates in
    the Keras order i, f, c, o):

        i = sigma(W_i x_t + U_i h_{t-1} + b_i)       input gate
        f = sigma(W_f x_t + U_f h_{t-1} + b_f)       forget gate (b_f initialised to 1)
        g = tanh(W_c x_t + U_c h_{t-1} + b_c)        candidate
        o = sigma(W_o x_t + U_o h_{t-1} + b_o)       output gate
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(c_t)

    `peepholes=True` adds the peephole connections of Gers, Schraudolph & Schmidhuber 2000
    ("Learning Precise Timing with LSTM Recurrent Networks", JMLR 3, 2002 / IJCNN 2000): the
    input and forget gates see c_{t-1} (+ p_i * c_{t-1}, + p_f * c_{t-1}) and the output gate
    sees c_t (+ p_o * c_t), with diagonal weights p.

    `layer_norm=True` is the layer-normalized LSTM of Ba, Kiros & Hinton 2016 ("Layer
    Normalization", arXiv:1607.06450): W x_t and U h_{t-1} are normalized separately (each with
    its own gain and bias) before they are summed, and c_t is normalized before the output tanh,
    h_t = o * tanh(LN(c_t)). The bias `b` is then redundant with the norm biases and not created.

    With neither option the cell equals `keras.layers.LSTMCell` (and, inside `keras.layers.RNN`,
    `keras.layers.LSTM`) given the same weights.

    Args:
        units: size of h and c (>= 1).
        activation: for the candidate and the cell output (tanh).
        recurrent_activation: for the gates (sigmoid).
        use_bias: add b (ignored with layer_norm, whose betas play its role).
        kernel_initializer / recurrent_initializer / bias_initializer: initializers.
        unit_forget_bias: initialise the forget-gate bias to 1 (Jozefowicz et al. 2015), so the
            cell remembers by default at the start of training.
        peepholes: add peephole connections (Gers et al. 2000).
        layer_norm: layer-normalize the projections and the cell (Ba et al. 2016).
        layer_norm_epsilon: epsilon of the layer norms.
        dropout / recurrent_dropout: rates of the per-sequence (variational) dropout masks on
            x_t and h_{t-1}, active in training only.
        seed: seed of the dropout masks.

    Returns (called by keras.layers.RNN): h_t and the state [h_t, c_t].
    """

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        unit_forget_bias=True,
        peepholes=False,
        layer_norm=False,
        layer_norm_epsilon=1e-3,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _init_cell(
            self,
            "LSTMCell",
            units=units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
        )
        self.unit_forget_bias = bool(unit_forget_bias)
        self.peepholes = bool(peepholes)
        self.layer_norm = bool(layer_norm)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.state_size = [self.units, self.units]

    def build(self, input_shape):
        features = _check_step_input(input_shape, "LSTMCell")
        u = self.units
        self.kernel = self.add_weight(
            shape=(features, 4 * u), name="kernel", initializer=self.kernel_initializer
        )
        self.recurrent_kernel = self.add_weight(
            shape=(u, 4 * u), name="recurrent_kernel", initializer=self.recurrent_initializer
        )
        self.bias = None
        if self.use_bias and not self.layer_norm:
            if self.unit_forget_bias:
                base = self.bias_initializer

                def bias_initializer(shape, dtype=None):
                    return ops.concatenate(
                        [
                            base((u,), dtype=dtype),
                            ops.ones((u,), dtype=dtype),
                            base((2 * u,), dtype=dtype),
                        ]
                    )

            else:
                bias_initializer = self.bias_initializer
            self.bias = self.add_weight(shape=(4 * u,), name="bias", initializer=bias_initializer)
        if self.peepholes:
            self.input_peephole = self.add_weight(
                shape=(u,), name="input_peephole", initializer="glorot_uniform"
            )
            self.forget_peephole = self.add_weight(
                shape=(u,), name="forget_peephole", initializer="glorot_uniform"
            )
            self.output_peephole = self.add_weight(
                shape=(u,), name="output_peephole", initializer="glorot_uniform"
            )
        if self.layer_norm:
            # The forget bias of 1 goes into the input projection's norm beta.
            def beta_init(shape, dtype=None):
                ones = ops.ones((u,), dtype=dtype) if self.unit_forget_bias else None
                zeros = ops.zeros((u,), dtype=dtype)
                forget = ones if ones is not None else zeros
                return ops.concatenate([zeros, forget, zeros, zeros])

            self.input_gamma = self.add_weight(
                shape=(4 * u,), name="input_gamma", initializer="ones"
            )
            self.input_beta = self.add_weight(
                shape=(4 * u,), name="input_beta", initializer=beta_init
            )
            self.recurrent_gamma = self.add_weight(
                shape=(4 * u,), name="recurrent_gamma", initializer="ones"
            )
            self.recurrent_beta = self.add_weight(
                shape=(4 * u,), name="recurrent_beta", initializer="zeros"
            )
            self.cell_gamma = self.add_weight(shape=(u,), name="cell_gamma", initializer="ones")
            self.cell_beta = self.add_weight(shape=(u,), name="cell_beta", initializer="zeros")

    def call(self, inputs, states, training=False):
        h_tm1, c_tm1 = states[0], states[1]
        if training and self.dropout > 0.0:
            inputs = inputs * self.get_dropout_mask(inputs)
        if training and self.recurrent_dropout > 0.0:
            h_tm1 = h_tm1 * self.get_recurrent_dropout_mask(h_tm1)
        x_proj = ops.matmul(inputs, self.kernel)
        h_proj = ops.matmul(h_tm1, self.recurrent_kernel)
        if self.layer_norm:
            eps = self.layer_norm_epsilon
            z = _layer_norm(x_proj, self.input_gamma, self.input_beta, eps) + _layer_norm(
                h_proj, self.recurrent_gamma, self.recurrent_beta, eps
            )
        else:
            z = x_proj + h_proj
            if self.bias is not None:
                z = z + self.bias
        z_i, z_f, z_c, z_o = ops.split(z, 4, axis=-1)
        if self.peepholes:
            z_i = z_i + self.input_peephole * c_tm1
            z_f = z_f + self.forget_peephole * c_tm1
        i = self.recurrent_activation(z_i)
        f = self.recurrent_activation(z_f)
        g = self.activation(z_c)
        c = f * c_tm1 + i * g
        if self.peepholes:
            z_o = z_o + self.output_peephole * c
        o = self.recurrent_activation(z_o)
        c_out = (
            _layer_norm(c, self.cell_gamma, self.cell_beta, self.layer_norm_epsilon)
            if self.layer_norm
            else c
        )
        h = o * self.activation(c_out)
        return h, [h, c]

    def get_initial_state(self, batch_size=None):
        return [ops.zeros((batch_size, d), dtype=self.compute_dtype) for d in self.state_size]

    def get_config(self):
        return {
            **super().get_config(),
            **_cell_config(self),
            "unit_forget_bias": self.unit_forget_bias,
            "peepholes": self.peepholes,
            "layer_norm": self.layer_norm,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


@keras.saving.register_keras_serializable(package="dlmodels")
class GRUCell(keras.layers.Layer, DropoutRNNCell):
    """Gated recurrent unit cell (Cho et al. 2014, "Learning Phrase Representations using RNN
    Encoder-Decoder for Statistical Machine Translation", EMNLP).

    One step, gates in the Keras order z, r, h of `kernel` W and `recurrent_kernel` U:

        z = sigma(W_z x_t + U_z h_{t-1} + b_z)                       update gate
        r = sigma(W_r x_t + U_r h_{t-1} + b_r)                       reset gate
        reset_after=False:  h~ = tanh(W_h x_t + U_h (r * h_{t-1}) + b_h)     (Cho et al.)
        reset_after=True:   h~ = tanh(W_h x_t + b_h + r * (U_h h_{t-1} + b'_h))  (cuDNN)
        h_t = z * h_{t-1} + (1 - z) * h~

    The last line is the Keras (and cuDNN, and ONNX) convention: z is the fraction of the old
    state that is *kept*. The textbook form of Cho et al. writes h_t = (1 - z) h_{t-1} + z h~,
    where z is the fraction that is *replaced*; the two are the same model with z <-> 1 - z
    (the update gate's weights and bias negated), so weights only carry over between
    implementations of the same convention. `reset_after=True` (the Keras default and what
    cuDNN implements) keeps separate input and recurrent biases, `bias` of shape (2, 3 units);
    ONNX calls it linear_before_reset=1. `reset_after=False` is the paper's order, with one bias
    of shape (3 units,).

    Equals `keras.layers.GRUCell` (and, inside `keras.layers.RNN`, `keras.layers.GRU`) given the
    same weights and `reset_after`.

    Args:
        units: size of h (>= 1).
        activation: for the candidate (tanh).
        recurrent_activation: for the gates (sigmoid).
        use_bias: add biases.
        kernel_initializer / recurrent_initializer / bias_initializer: initializers.
        reset_after: apply the reset gate after the recurrent matmul (see above).
        dropout / recurrent_dropout: rates of the per-sequence dropout masks on x_t and h_{t-1},
            active in training only.
        seed: seed of the dropout masks.

    Returns (called by keras.layers.RNN): h_t and the state h_t.
    """

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        reset_after=True,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _init_cell(
            self,
            "GRUCell",
            units=units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
        )
        self.reset_after = bool(reset_after)
        self.state_size = self.units

    def build(self, input_shape):
        features = _check_step_input(input_shape, "GRUCell")
        u = self.units
        self.kernel = self.add_weight(
            shape=(features, 3 * u), name="kernel", initializer=self.kernel_initializer
        )
        self.recurrent_kernel = self.add_weight(
            shape=(u, 3 * u), name="recurrent_kernel", initializer=self.recurrent_initializer
        )
        self.bias = None
        if self.use_bias:
            shape = (2, 3 * u) if self.reset_after else (3 * u,)
            self.bias = self.add_weight(shape=shape, name="bias", initializer=self.bias_initializer)

    def call(self, inputs, states, training=False):
        h_tm1 = states[0] if isinstance(states, list | tuple) else states
        if training and self.dropout > 0.0:
            inputs = inputs * self.get_dropout_mask(inputs)
        h_in = h_tm1
        if training and self.recurrent_dropout > 0.0:
            h_in = h_tm1 * self.get_recurrent_dropout_mask(h_tm1)
        u = self.units
        x_proj = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            x_proj = x_proj + (self.bias[0] if self.reset_after else self.bias)
        x_z, x_r, x_h = ops.split(x_proj, 3, axis=-1)
        if self.reset_after:
            h_proj = ops.matmul(h_in, self.recurrent_kernel)
            if self.bias is not None:
                h_proj = h_proj + self.bias[1]
            h_z, h_r, h_h = ops.split(h_proj, 3, axis=-1)
            z = self.recurrent_activation(x_z + h_z)
            r = self.recurrent_activation(x_r + h_r)
            candidate = self.activation(x_h + r * h_h)
        else:
            h_zr = ops.matmul(h_in, self.recurrent_kernel[:, : 2 * u])
            h_z, h_r = ops.split(h_zr, 2, axis=-1)
            z = self.recurrent_activation(x_z + h_z)
            r = self.recurrent_activation(x_r + h_r)
            candidate = self.activation(
                x_h + ops.matmul(r * h_in, self.recurrent_kernel[:, 2 * u :])
            )
        h = z * h_tm1 + (1.0 - z) * candidate
        return h, [h] if isinstance(states, list | tuple) else h

    def get_initial_state(self, batch_size=None):
        return [ops.zeros((batch_size, self.units), dtype=self.compute_dtype)]

    def get_config(self):
        return {
            **super().get_config(),
            **_cell_config(self),
            "reset_after": self.reset_after,
        }


@keras.saving.register_keras_serializable(package="dlmodels")
class SequenceCheck(keras.layers.Layer):
    """The identity on [batch, time, features] (or [batch, time] token) inputs that refuses the
    wrong rank and zero-length sequences with a clear message, where TensorFlow's recurrent loop
    would fail with "slice index 0 of dimension 1 out of bounds".

    The check is static: it runs whenever the shape is known (eager calls, `predict`, tracing
    with concrete shapes) and costs nothing in an exported graph.

    Args:
        rank: 3 for feature sequences, 2 for token ids.
    """

    def __init__(self, rank=3, **kwargs):
        super().__init__(**kwargs)
        if rank not in (2, 3):
            raise ValueError(f"SequenceCheck: `rank` must be 2 or 3, got {rank!r}")
        self.rank = int(rank)
        self.supports_masking = True

    def _check(self, shape):
        shape = tuple(shape)
        if len(shape) != self.rank:
            want = "[batch, time, features]" if self.rank == 3 else "[batch, time] token ids"
            raise ValueError(
                f"{self.name}: expected {want}, got an input of rank {len(shape)} (shape "
                f"{shape}). A single sequence needs a batch axis (x[None]); a univariate series "
                "needs a features axis (x[..., None])."
            )
        if shape[1] is not None and shape[1] == 0:
            raise ValueError(
                f"{self.name}: got sequences of length 0 (shape {shape}); a recurrent model "
                "needs at least one time step per sequence. Drop empty sequences, or pad them "
                "to length >= 1 and mask the padding."
            )

    def build(self, input_shape):
        self._check(input_shape)

    def call(self, inputs):
        self._check(inputs.shape)
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rank": self.rank}


@keras.saving.register_keras_serializable(package="dlmodels")
class LastStep(keras.layers.Layer):
    """The last time step of a [batch, time, features] sequence, as a one-step sequence
    [batch, 1, features] of its first `features` channels (all when None): the seed of an
    autoregressive decoder (the last observed value of the forecast targets).

    Args:
        features: how many leading channels to keep (None: all).
    """

    def __init__(self, features=None, **kwargs):
        super().__init__(**kwargs)
        if features is not None:
            features = check_positive_int("features", features, owner="LastStep")
        self.features = features

    def call(self, inputs):
        last = inputs[:, -1:, :]
        return last if self.features is None else last[..., : self.features]

    def compute_output_shape(self, input_shape):
        features = input_shape[-1] if self.features is None else self.features
        return (input_shape[0], 1, features)

    def get_config(self):
        return {**super().get_config(), "features": self.features}
