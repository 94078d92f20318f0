"""Execute notebooks and write their outputs back.

    python -m notebooks.run                          # every notebook, full mode, outputs in place
    python -m notebooks.run 02 03 --timeout 900      # some of them (a number, name or path)
    python -m notebooks.run --smoke                  # tiny sizes: a quick check, writes nothing
    python -m notebooks.run --smoke --out /tmp/nb    # ... and keep the executed copies there

Each notebook runs in a fresh kernel of this Python, in the folder it is written to, with
``LONGCTX_SMOKE`` set to 1 (``--smoke``) or 0 and the repository root on ``PYTHONPATH``. A
notebook that raises, or runs past ``--timeout`` seconds, fails: it is reported, nothing is
written for it, the others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = ROOT / "notebooks"
NEEDED = ("nbclient", "nbformat", "ipykernel")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours of IPython tracebacks


class NotebookError(Exception):
    """A notebook raised, timed out or could not start its kernel."""


def missing_packages() -> list[str]:
    """The packages among :data:`NEEDED` that this Python cannot import."""
    import importlib.util

    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def notebooks(names: list[str] | None = None) -> list[pathlib.Path]:
    """The notebooks named (``01``, ``01_quickstart``, a path), or all of them in order."""
    every = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return every
    found = []
    for name in names:
        path = pathlib.Path(name)
        if path.suffix == ".ipynb" and path.is_file():
            found.append(path.resolve())
            continue
        match = [p for p in every if p.stem == name or p.stem.split("_")[0] == name]
        if len(match) != 1:
            raise NotebookError(f"no notebook {name!r}; there are: "
                                f"{', '.join(p.stem for p in every)}")
        found.append(match[0])
    return found


def execute(path: str | os.PathLike, *, smoke: bool, timeout: float = 600.0,
            out: str | os.PathLike | None = None, write: bool = True) -> float:
    """Run the notebook at ``path`` in a fresh kernel, in the folder it is written to (``out``
    if given, else ``path`` itself, in place); returns the seconds it took.

    ``timeout`` bounds the whole notebook. Raises :class:`NotebookError` if a cell raises, the
    time runs out or the kernel cannot start; nothing is written then.
    """
    import nbclient
    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = pathlib.Path(path).resolve()
    target = pathlib.Path(out).resolve() / path.name if out is not None else path
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "LONGCTX_SMOKE": "1" if smoke else "0", "LONGCTX_REPO": str(ROOT),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    deadline = time.monotonic() + timeout
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", resources={"metadata": {"path": str(target.parent)}},
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        extra_arguments=["--IPKernelApp.log_level=ERROR"])  # not its note on local TCP
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        client.execute(env=env)
    except CellTimeoutError as e:
        raise NotebookError(f"{path.name}: ran past {timeout:.0f} s") from e
    except (CellExecutionError, DeadKernelError, RuntimeError) as e:
        raise NotebookError(f"{path.name}: {re.sub(ANSI, '', str(e))}") from e
    seconds = time.perf_counter() - t0
    if write:
        nbformat.write(nb, target)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m notebooks.run",
                                 description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("names", nargs="*", help="notebooks: 01, 01_quickstart or a path "
                    "(default: all)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (LONGCTX_SMOKE=1); outputs are written only with --out")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds each notebook may take (default 600)")
    ap.add_argument("--out", default=None,
                    help="write the executed notebooks to this folder instead of in place "
                         "(they also run there)")
    args = ap.parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"notebooks.run: error: this Python ({sys.executable}) lacks "
              f"{', '.join(missing)}; install the development extra (pip install -e '.[dev]') "
              "or those packages with their dependencies", file=sys.stderr)
        return 2
    try:
        paths = notebooks(args.names)
    except NotebookError as e:
        print(f"notebooks.run: error: {e}", file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "full"
    failed = []
    for path in paths:
        print(f"{path.name} ({mode} mode) ...", flush=True)
        try:
            seconds = execute(path, smoke=args.smoke, timeout=args.timeout, out=args.out,
                              write=args.out is not None or not args.smoke)
        except NotebookError as e:
            failed.append(path.name)
            print(f"FAILED {e}", file=sys.stderr, flush=True)
            continue
        print(f"{path.name}: {seconds:.1f} s", flush=True)
    if failed:
        print(f"{len(failed)} of {len(paths)} notebooks failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
