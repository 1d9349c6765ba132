"""What a person sees of long work: progress as plain lines where output is not a terminal (as the work
goes, at full width), a live bar on a terminal that keeps the run's log plain, the run's log.txt, and
sampling's progress per network evaluation (counted against the real sampler's calls)."""
import contextlib
import io
import os
import pty
import select
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ambient_fast.sampling.samplers import ambient_sample, seeded_inputs
from ambient_fast.training.console import RunLog, WorkProgress, log_only, print_rows
from ambient_fast.training.reporting import progress_per_evaluation, sampler_evaluations

from test_sample import small_model


def plain_lines(run) -> "list[str]":
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run()
    return out.getvalue().splitlines()


def test_plain_progress_writes_a_line_per_interval_at_full_width():
    info = "loss 0.123 | " + "x" * 150  # far past 80 columns: never cut, never wrapped

    def work(interval):
        def run():
            with WorkProgress("training", 4, "steps", interval=interval) as progress:
                for step in range(1, 5):
                    progress.update(completed=step, info=info)
        return run

    every = plain_lines(work(0))
    assert len(every) == 5  # the start, then every update (the end's state is the last update's)
    assert every[0].startswith("training: 0/4 steps (0%)") and "ETA ?" in every[0]
    assert every[2].startswith("training: 2/4 steps (50%)") and every[2].endswith(info)
    assert every[-1].startswith("training: 4/4 steps (100%)") and "ETA 0 s" in every[-1]
    sparse = plain_lines(work(3600))  # the first line, then the end's
    assert len(sparse) == 2 and sparse[0].startswith("training: 0/4 steps")
    assert sparse[1].startswith("training: 4/4 steps (100%)") and sparse[1].endswith(info)


def test_progress_lines_appear_as_the_work_goes():
    """Output to a pipe: the first lines arrive while the work is still going (here: waiting for the
    test to say go on), not at the end."""
    script = textwrap.dedent("""
        import sys
        from ambient_fast.training.console import WorkProgress
        with WorkProgress("sampling", 2, "images", interval=0) as progress:
            progress.update(advance=1)
            sys.stdin.readline()   # the work goes on only when the test has read the lines so far
            progress.update(advance=1)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        first, second = child.stdout.readline(), child.stdout.readline()
        assert first.startswith("sampling: 0/2 images") and second.startswith("sampling: 1/2 images (50%)")
        assert child.poll() is None  # still working
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().startswith("sampling: 2/2 images (100%)")
    finally:
        child.communicate(timeout=60)
    assert child.returncode == 0


def test_run_log_keeps_everything_the_console_showed(tmp_path):
    """Printed before the log's file is known, after, on stderr, and detail for the log alone; a
    second session appends; the streams are given back."""
    path = tmp_path / "log.txt"
    for session in (1, 2):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            log = RunLog().open()
            try:
                print(f"before the run folder {session}")
                log.attach(path)
                print_rows([("data", "somewhere"), ("corruption", "dust")])
                print(f"warning {session}", file=sys.stderr)
                log_only(f"detail {session}")
            finally:
                log.close()
            assert sys.stdout is out and sys.stderr is err
        assert out.getvalue() == f"before the run folder {session}\ndata        somewhere\ncorruption  dust\n"
        assert err.getvalue() == f"warning {session}\n"
    text = path.read_text()
    assert text.count("--- ") == 2  # one header per session
    for session in (1, 2):
        assert (f"before the run folder {session}\ndata        somewhere\ncorruption  dust\nwarning {session}\n"
                f"detail {session}\n") in text
    log = RunLog().open()
    log.attach(None)  # another rank: the console only
    log.close()


def test_a_live_bar_on_a_terminal_keeps_the_log_plain(tmp_path):
    """On a terminal (a pseudo-terminal here) the bar draws there; the log gets the plain lines and
    what was printed while the bar showed, and none of the bar's drawing."""
    path = tmp_path / "log.txt"
    script = textwrap.dedent(f"""
        from ambient_fast.training.console import RunLog, WorkProgress
        log = RunLog().open()
        log.attach({str(path)!r})
        with WorkProgress("training", 3, "steps", interval=0) as progress:
            progress.update(completed=1, info="loss 1.5")
            print("rolled back to step 1")
            progress.update(completed=3, info="loss 0.5")
        log.close()
    """)
    leader, follower = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", script], stdin=follower, stdout=follower, stderr=follower,
                             env=dict(os.environ, TERM="xterm", COLUMNS="100"))
    os.close(follower)
    shown = b""
    deadline = time.time() + 60
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        elif child.poll() is not None:
            break
    child.wait(timeout=60)
    os.close(leader)
    assert child.returncode == 0, shown.decode(errors="replace")
    screen = shown.decode(errors="replace")
    assert "\x1b[" in screen and "3/3 steps" in screen and "rolled back to step 1" in screen  # drawn live
    text = path.read_text()
    assert "\x1b" not in text  # no terminal drawing in the log
    lines = text.splitlines()
    assert lines[1].startswith("training: 0/3 steps") and lines[2].startswith("training: 1/3 steps")
    assert lines[3] == "rolled back to step 1" and lines[-1].startswith("training: 3/3 steps (100%)")


@pytest.mark.parametrize("solver,steps,guidance,masks", [("heun", 3, 0.0, 1), ("euler", 3, 0.0, 1),
                                                         ("heun", 2, 0.05, 2)])
def test_sampling_progress_moves_per_network_evaluation(solver, steps, guidance, masks):
    """The count of evaluations is the real sampler's number of network calls: the progress moves
    by an equal share at each call and reaches the batch exactly at its last."""
    model = small_model()
    latents, drawn = seeded_inputs(range(2), (3, 8, 8), masks, 0.5, False, "cpu")
    seen = []
    evaluations = sampler_evaluations(steps, solver, masks if guidance else 1)
    with progress_per_evaluation(model, 2, evaluations, seen.append, done=5):
        ambient_sample(model, latents, drawn, num_steps=steps, solver=solver, guidance=guidance, dtype=torch.float32)
    calls, end = seen[:-1], seen[-1]
    assert len(calls) == evaluations and end == 7
    assert calls == pytest.approx([5 + 2 * (i + 1) / evaluations for i in range(evaluations)])
    assert not model._forward_hooks  # the counting hook is gone
