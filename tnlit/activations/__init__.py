"""The teacher's activations: captured by hooks (``capture``), kept on disk (``store``), read back by a DataModule
(``datamodule``), and summed into each layer's input covariance for the activation-aware start (``calibration``)."""

from tnlit.activations.calibration import activation_init_, input_covariances, layer_inputs
from tnlit.activations.capture import StopForward, batch_input, capture, capture_student
from tnlit.activations.datamodule import ActivationDataModule
from tnlit.activations.store import ActivationStore, data_fingerprint, open_store, teacher_fingerprint

__all__ = [
    "ActivationDataModule",
    "ActivationStore",
    "StopForward",
    "activation_init_",
    "batch_input",
    "capture",
    "capture_student",
    "data_fingerprint",
    "input_covariances",
    "layer_inputs",
    "open_store",
    "teacher_fingerprint",
]
