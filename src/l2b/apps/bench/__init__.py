"""`l2b bench step | epoch | weights | data | ddp`, one module each (``common``: what they share).

``step``: per-step cost of plain CE, the exact L2B step (fused as the trainer runs it, with the fast
tangent rules of :mod:`l2b.fastnorm` and with PyTorch's generic ones, and unfused), the
finite-difference L2B step, the double-backward reference and, with ``peer="higher"``, the published
recipe (a ``higher``-based double backward); plus the components an exact step is made of, from
which it prints the floor of an exact step. The steps run interleaved in one process on the same
model and batches, so machine noise hits them alike; the ratios, not the absolute times, are the
result: each kind's ratio to CE is the median of its per-round ratios (paired). With ``memory`` each
kind's peak memory over one step is measured in a fresh process.

``epoch``: images per second of a whole training epoch per method (plain CE, L2B exact, L2B fd, or
any registered method by name: l2rw, mlc, mwnet, ...) over random data of a given shape held on the
device as uint8, as the trainer holds its data, plus the cost of making the batches alone (the data
pipeline).

``data``: the cost of feeding a Fashion-MNIST epoch against a CE epoch; with ``--stream``, image files
decoded per batch by the streaming reader: images/s per worker and the share of a step spent waiting.

``ddp``: the fused against the unfused L2B step under DistributedDataParallel, gloo ranks on the CPU,
as a paired ratio; with ``--compile``, whether the fused forward runs through torch.compile.

Every timed step is the method's own ``step`` (the trainer's code) followed by the trainer's update
(backward, clipping at 5, SGD); only the reference is assembled here.
"""

from .common import higher_meta_weights
from .data import (
           bench_data,
           bench_stream,
           format_data_table,
           format_stream_table,
           write_jpegs,
)
from .ddp import bench_ddp, format_ddp_table, fused_compile_check
from .epoch import bench_epoch, bench_weights, format_epoch_table, format_weights_table
from .step import bench_step, format_step_table, peak_memory_of_step

__all__ = ["bench_data", "bench_ddp", "bench_epoch", "bench_step", "bench_stream", "bench_weights", "format_data_table",
           "format_ddp_table", "format_epoch_table", "format_step_table", "format_stream_table",
           "format_weights_table", "fused_compile_check", "higher_meta_weights", "peak_memory_of_step", "write_jpegs"]
