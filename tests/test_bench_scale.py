import sys

import pytest
import torch
import torch.nn.functional as F

from l2b import L2BError, create_model, meta_weights
from l2b.apps.bench import step as bench_step_module
from l2b.apps.bench import bench_epoch, bench_step, bench_weights, format_step_table, higher_meta_weights


def test_bench_step_reports_fd_and_amp():
    r = bench_step(batch_size=8, val_batch_size=4, image_shape=(1, 8, 8), steps=2, warmup=0, amp="bf16",
                   channels_last=True, reference=False)
    assert set(r["seconds"]) == {"ce", "l2b_exact", "l2b_exact_generic", "l2b_unfused", "l2b_fd"}
    assert r["amp"] == "bf16" and r["l2b_over_reference"] is None and r["l2b_over_peer"] is None
    assert all(0 < r["min_seconds"][k] <= v for k, v in r["seconds"].items())
    assert set(r["components"]) == {"forward", "backward", "clean_pass", "dual_forward",
                                    "dual_forward_generic"}
    # the floor is assembled from the components: a CE step plus a clean pass plus a backward
    assert r["floor_seconds"] > 0 and r["floor_ratio_to_ce"] > 1
    assert "floor of an exact step" in format_step_table(r)


def test_the_peer_recipe_computes_the_same_weights_as_l2b():
    # `--peer higher` times the published recipe; it must compute what l2b computes, or the ratio means nothing
    pytest.importorskip("higher")
    torch.manual_seed(0)
    net = create_model("small-cnn", num_classes=4, in_channels=2, width=4).double()
    x, y = torch.randn(12, 2, 8, 8, dtype=torch.double), torch.randint(0, 4, (12,))
    xv, yv = torch.randn(10, 2, 8, 8, dtype=torch.double), torch.randint(0, 4, (10,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    for _ in range(2):  # momentum buffers exist
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    want = meta_weights(net, x, y, xv, yv, optimizer=opt)
    alpha, beta, pseudo = higher_meta_weights(net, opt, x, y, xv, yv)
    assert torch.equal(pseudo, want.pseudo)
    assert torch.allclose(alpha, want.alpha, atol=1e-10) and torch.allclose(beta, want.beta, atol=1e-10)


def test_peer_without_its_package_and_unknown_peers_are_refused(monkeypatch):
    monkeypatch.setattr(bench_step_module, "has_higher", False)
    with pytest.raises(L2BError, match="pip install higher"):
        bench_step(batch_size=8, val_batch_size=4, image_shape=(1, 8, 8), steps=1, peer="higher")
    with pytest.raises(L2BError, match="--peer must be one of higher"):
        bench_step(batch_size=8, val_batch_size=4, image_shape=(1, 8, 8), steps=1, peer="maml")


def test_peak_memory_of_one_step_is_measured_in_a_fresh_process():
    config = dict(model="small-cnn", batch_size=64, val_batch_size=32, image_shape=[1, 16, 16], num_classes=10,
                  device="cpu", amp="off", channels_last=False, seed=0, kind="l2b_exact")
    peak = bench_step_module._peak_memory_in_child(config)
    if sys.platform == "linux":  # elsewhere there is no /proc/self/clear_refs to reset the peak with
        assert 1 < peak < 500  # the step's activations (a few MiB), not the process's whole footprint


def test_bench_epoch_counts_whole_batches():
    r = bench_epoch(num_images=40, batch_size=16, val_batch_size=8, image_shape=(1, 8, 8), num_clean=20,
                    methods=("ce", "l2b_fd"))
    assert r["num_images"] == 32 and set(r["images_per_second"]) == {"data", "ce", "l2b_fd"}
    with pytest.raises(L2BError, match="l2b_exact"):
        bench_epoch(num_images=16, batch_size=8, image_shape=(1, 8, 8), methods=("nope",))
    with pytest.raises(L2BError, match="--repeats must be >= 1"):
        bench_epoch(num_images=16, batch_size=8, image_shape=(1, 8, 8), repeats=0)


def test_bench_epoch_times_registered_methods_with_their_prepare_hooks():
    # glc, mlc and distill need their prepare() (corruption matrix, meta network, teacher) to step at all
    r = bench_epoch(num_images=32, batch_size=16, val_batch_size=8, image_shape=(1, 8, 8), num_clean=20,
                    methods=("l2rw", "mlc", "glc", "distill"), augment=False)
    assert set(r["seconds"]) == {"data", "l2rw", "mlc", "glc", "distill"}
    assert all(v > 0 for v in r["seconds"].values())


def test_bench_weights_compares_with_exact_float32():
    r = bench_weights(batch_size=16, val_batch_size=8, image_shape=(1, 8, 8), train_steps=2)
    fd = r["results"]["fd_fp32"]
    assert 0.9 < fd["pearson_raw"] <= 1.0 + 1e-9 and 0 <= fd["relative_l1_weights"] < 0.5


def test_bench_stream_reports_rates_and_wait_shares_per_worker_count():
    from l2b.apps.bench import bench_stream, format_stream_table

    r = bench_stream(image_sizes=(16,), num_images=12, workers=(0, 1), batch_size=4, val_batch_size=2, repeats=1)
    s = r["sizes"]["16"]
    assert set(s["images_per_second"]) == {"0", "1"} and all(v > 0 for v in s["images_per_second"].values())
    assert all(0 < v < 1 for v in s["wait_share"].values())  # a step both waits and computes
    assert s["workers_to_keep_up"] >= 1 and s["step_compute_seconds"] > 0
    assert "workers to keep up with this step" in format_stream_table(r)
    with pytest.raises(L2BError, match="--num-images"):
        bench_stream(image_sizes=(16,), num_images=4, batch_size=4, val_batch_size=2)


def test_bench_ddp_refuses_one_rank_and_indivisible_batches():
    from l2b.apps.bench import bench_ddp

    with pytest.raises(L2BError, match="--nproc must be >= 2"):
        bench_ddp(nproc=1)
    with pytest.raises(L2BError, match="divisible by --nproc"):
        bench_ddp(nproc=2, batch_size=7)
