import pytest

from l2b import L2BError
from l2b.apps.bench import bench_epoch, bench_step, bench_weights


def test_bench_step_reports_fd_and_amp():
    r = bench_step(batch_size=8, val_batch_size=4, image_shape=(1, 8, 8), steps=1, warmup=0, amp="bf16",
                   channels_last=True, reference=False)
    assert set(r["seconds"]) == {"ce", "l2b_exact", "l2b_fd"} and r["amp"] == "bf16"
    assert all(v > 0 for v in r["seconds"].values())


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
