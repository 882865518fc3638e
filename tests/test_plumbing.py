"""The run machinery in runtime.py: N processes behave like one, and runs resume without loss.

Multi-process cases spawn real gloo process groups on this CPU and compare against one process (or
plain PyTorch) on the same global batch.
"""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import data
import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = runtime.init_distributed("cpu")
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    model = runtime.sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3).double()), dist)
    per_rank = 8 // world
    x_local = x[rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_()
    y = model(x_local)
    # A loss whose weights depend on the global sample index, so each sample's gradient is distinct.
    weights = (torch.arange(y.numel(), dtype=y.dtype) + rank * y.numel()).view_as(y).sin()
    (y * weights).sum().backward()
    weight_grad = model[0].weight.grad.clone()
    if world > 1:
        torch.distributed.all_reduce(weight_grad)
    sampler = runtime.GlobalBatchSampler(list(range(23)), 8, dist, seed=3, epoch=1)
    batches = [runtime.all_gather_cat(torch.tensor(b), dist).tolist() for b in sampler]
    shard = list(range(rank, 11, world))
    (ordered,) = runtime.gather_eval(shard, dist, torch.tensor(shard) * 10)
    result = dict(y=runtime.all_gather_cat(y.detach(), dist), x_grad=runtime.all_gather_cat(x_local.grad, dist),
                  weight_grad=weight_grad, running_mean=model[0].running_mean,
                  running_var=model[0].running_var, batches=batches, ordered=ordered)
    if rank == 0:
        torch.save(result, out_file)
    runtime.close_distributed()


def _run(world, tmp_path):
    out = str(tmp_path / f"world{world}.pt")
    mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world)
    return torch.load(out)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return _run(1, tmp), _run(2, tmp)


def test_batchnorm_over_two_processes_equals_one_process(one_and_two):
    one, two = one_and_two
    for key in ["y", "x_grad", "weight_grad", "running_mean", "running_var"]:
        torch.testing.assert_close(two[key], one[key], rtol=1e-12, atol=1e-12, msg=key)


def test_global_batches_do_not_depend_on_process_count(one_and_two):
    one, two = one_and_two
    assert one["batches"] == two["batches"]
    assert len(one["batches"]) == 23 // 8
    flat = [i for b in one["batches"] for i in b]
    assert len(set(flat)) == len(flat) == 16


def test_gather_eval_restores_dataset_order(one_and_two):
    for result in one_and_two:
        assert result["ordered"].tolist() == [10 * i for i in range(11)]


def test_sampler_rejects_indivisible_and_oversized_batches():
    with pytest.raises(ValueError, match="not divisible"):
        runtime.GlobalBatchSampler(list(range(10)), 5, runtime.Dist(world_size=2), seed=0)
    with pytest.raises(ValueError, match="larger than"):
        runtime.GlobalBatchSampler(list(range(3)), 4, runtime.Dist(), seed=0)


def test_sampler_epochs_differ_and_repeat():
    sampler = runtime.GlobalBatchSampler(list(range(40)), 8, runtime.Dist(), seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and first != second


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = str(tmp_path / "x.json")
    runtime.write_json(path, {"a": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("{torn")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        runtime.atomic_write(path, broken)
    assert json.load(open(path)) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


class _Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_rundir_refuses_to_overwrite_and_trims_log_on_resume(tmp_path):
    out = str(tmp_path / "run")
    run = runtime.RunDir(out, _Args(lr=0.1), runtime.Dist())
    assert json.load(open(os.path.join(out, "args.json"))) == {"lr": 0.1}
    for epoch in range(3):
        run.log_epoch({"epoch": epoch, "loss": 1.0 / (epoch + 1)})
    run.save({"epoch": 2, "weights": torch.arange(3)})  # killed during epoch 2, after logging it
    with pytest.raises(ValueError, match="--resume"):
        runtime.RunDir(out, _Args(lr=0.1), runtime.Dist())
    resumed = runtime.RunDir(out, _Args(lr=0.1), runtime.Dist(), resume=True)
    state = resumed.resume_state()
    assert state["epoch"] == 2 and state["weights"].tolist() == [0, 1, 2]
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.jsonl"))]
    assert epochs == [0, 1]


class _Data:
    def __init__(self, classnames, labels):
        self.classnames, self.imagenet_ids = classnames, list(range(len(classnames)))
        self.train = _Args(labels=np.asarray(labels))


def test_resume_on_other_data_is_refused(tmp_path):
    out = str(tmp_path / "run")
    start = _Data(["cat", "dog", "fox"], [0, 1, 2, 2])
    runtime.RunDir(out, _Args(lr=0.1), runtime.Dist(), identity=data.data_identity(start)).save({"epoch": 1})
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["data"]["classnames"] == \
        ["cat", "dog", "fox"]
    same = runtime.RunDir(out, _Args(lr=0.1), runtime.Dist(), resume=True, identity=data.data_identity(_Data(["cat", "dog", "fox"], [0, 1, 2, 2])))
    assert same.resume_state()["epoch"] == 1
    moved = _Data(["cat", "dog", "fox"], [0, 1, 2, 2])
    moved.imagenet_ids = [0, 1, 7]
    cases = [(_Data(["cat", "owl", "fox"], [0, 1, 2, 2]), "other classes (class 1 is 'owl' now, 'dog' then)"),
             (_Data(["cat", "dog"], [0, 1, 1, 1]), "other classes (2 now, 3 then)"),
             (moved, "other classes (class 2, 'fox', has ImageNet id 7 now, 2 then)"),
             (_Data(["cat", "dog", "fox"], [0, 1, 2]), "another training set (3 images now, 4 then)"),
             (_Data(["cat", "dog", "fox"], [0, 1, 1, 2]), "another training set (as many images, 4, but other "
                                                           "samples, labels or data seed)")]
    for other, message in cases:
        with pytest.raises(ValueError, match=re.escape(f"cannot resume {out}: its checkpoint was trained on {message}")):
            runtime.RunDir(out, _Args(lr=0.2), runtime.Dist(), resume=True, identity=data.data_identity(other)).resume_state()
        assert json.load(open(os.path.join(out, "args.json"))) == {"lr": 0.1}  # kept: the run's own flags
    # a checkpoint written before data identities were saved resumes as before
    runtime.save_checkpoint(os.path.join(out, "checkpoint.pt"), {"epoch": 2})
    assert runtime.RunDir(out, _Args(lr=0.1), runtime.Dist(), resume=True, identity=data.data_identity(cases[0][0])).resume_state()["epoch"] == 2


def test_resume_names_flags_that_changed(tmp_path, capsys):
    out = str(tmp_path / "run")
    run = runtime.RunDir(out, _Args(lr=0.1, scale=(0.1, 1.0), num_train=600, resume=False), runtime.Dist())
    run.save({"epoch": 1})
    capsys.readouterr()
    runtime.RunDir(out, _Args(lr=0.1, scale=(0.1, 1.0), num_train=600, resume=True), runtime.Dist(), resume=True)
    assert capsys.readouterr().err == ""  # the same flags (a tuple reads back as a list): nothing to say
    runtime.RunDir(out, _Args(lr=0.2, scale=(0.1, 1.0), num_train=800, resume=True), runtime.Dist(), resume=True)
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --lr is 0.2 now but was 0.1 in {os.path.join(out, 'args.json')}",
        f"warning: --num-train is 800 now but was 600 in {os.path.join(out, 'args.json')}"]
    runtime.warn_changed_flags({"lr": 0.1, "num_train": 600}, _Args(lr=0.2, num_train=800), "x", keys={"num_train"})
    assert capsys.readouterr().err.splitlines() == ["warning: --num-train is 800 now but was 600 in x"]


def test_unreadable_checkpoint_is_named(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        runtime.load_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        runtime.load_checkpoint(str(tmp_path / "missing.pt"))


def test_rng_state_round_trip():
    state = runtime.rng_state()
    a = (torch.rand(3), torch.randint(0, 1000, (1,)).item())
    runtime.set_rng_state(state)
    b = (torch.rand(3), torch.randint(0, 1000, (1,)).item())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_check_finite_names_the_step():
    runtime.check_finite(torch.tensor(1.5), epoch=0, step=3)
    with pytest.raises(FloatingPointError, match="epoch 2 step 7"):
        runtime.check_finite(torch.tensor(float("nan")), epoch=2, step=7)


def _run_fails_py(tmp_path, code):
    """Run `code` as a script fails.py with the repository importable; the finished process."""
    script = tmp_path / "fails.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})


@pytest.mark.parametrize("raise_it, first_line", [
    ("raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB.\\nmore')",
     "CUDA out of memory. Tried to allocate 20.00 GiB."),
    ("torch.empty(2 ** 62, dtype=torch.uint8)", "DefaultCPUAllocator"),
    ("raise MemoryError('Unable to allocate 75.0 GiB for an array')", "Unable to allocate 75.0 GiB for an array"),
])
def test_run_cli_reports_out_of_memory_in_one_line(tmp_path, raise_it, first_line):
    proc = _run_fails_py(tmp_path, f"import torch, runtime\ndef main():\n    {raise_it}\nruntime.run_cli(main)\n")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fails.py: error: out of memory (") and first_line in lines[0]
    assert "lower --batch-size" in lines[0]
    # any other RuntimeError keeps its traceback: it is a bug, not bad input
    proc = _run_fails_py(tmp_path, "import runtime\ndef main():\n    raise RuntimeError('shape mismatch')\n"
                                   "runtime.run_cli(main)\n")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "shape mismatch" in proc.stderr


def test_run_cli_turns_bad_input_into_one_line_and_exit_2(tmp_path):
    proc = _run_fails_py(tmp_path, "import runtime\n"
                                   "def main():\n    raise ValueError('--voc 500 is larger than the 100 classes')\n"
                                   "runtime.run_cli(main)\n")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fails.py: error: --voc 500 is larger than the 100 classes"
    # raised in a DataLoader worker: the error is the worker's own message, still one line
    proc = _run_fails_py(tmp_path, "import torch, runtime\n"
                                   "class Bad(torch.utils.data.Dataset):\n"
                                   "    def __len__(self): return 4\n"
                                   "    def __getitem__(self, i): raise ValueError('3 of 4 images read so far are "
                                   "unreadable')\n"
                                   "def main():\n    list(torch.utils.data.DataLoader(Bad(), num_workers=1))\n"
                                   "runtime.run_cli(main)\n")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fails.py: error: 3 of 4 images read so far are unreadable"
