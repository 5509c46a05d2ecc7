"""``IGNORE_INDEX``: the label of a row (a position) that is not trained, PyTorch's and
Hugging Face's convention. Defined here, with the kernels that skip such rows, so that the
kernels stay free of the rest of drift_engine; the ops, packing, the models and the demo
import it from here."""

IGNORE_INDEX = -100
