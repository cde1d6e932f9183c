"""One canvas over several processes (torch.distributed), plugged into the model and the VAE from outside:
`comm` (process group, collectives), `halo` (halo attention, the canvas forward over ranks: enable / disable),
`vae` (the banded decode's row partition), `launch` (torchrun for --nproc, local ranks for tests)."""
from .comm import (DEFAULT_TIMEOUT_S, TIMEOUT_ENV, Dist, broadcast_tensors, combine_moments, fail_fast, gather_rows,
                   gather_rows_to_main, launched_by_torchrun, on_main, send_recv, setup, split_rows, teardown)
from .halo import Band, CommStats, DistState, HaloLayout, check_world, disable, dist_of, enable, halo_window_attention
from .halo import check_ranks
from .hood import HoodBand, HoodLayout, hood_attention, row_unit, split_token_rows
from .launch import die_with_parent, launch_local, run_local, torchrun_command
