"""The test suite's hang watchdog (conftest.py): a test that runs past CCAJAX_TEST_HANG_S
seconds (a deadlocked interpreted kernel, say) ends the run with every thread's traceback."""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_a_hung_test_ends_the_run_with_its_traceback(tmp_path, workers):
    """Under pytest-xdist (`make test`) the hung test's worker ends instead: xdist reports the
    test as crashed and the other workers carry on; the run still fails."""
    if workers:
        pytest.importorskip("xdist")
    shutil.copy(pathlib.Path(__file__).with_name("conftest.py"), tmp_path)
    (tmp_path / "test_hangs.py").write_text("import time\n\n\ndef test_hangs():\n"
                                             "    time.sleep(300)\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *workers, "test_hangs.py"], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "CCAJAX_TEST_HANG_S": "3"},
                            timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert time.monotonic() - start < 120, output
    assert "test_hangs.py::test_hangs still running after 3 s" in output, output
    assert 'test_hangs.py", line 5 in test_hangs' in output, output
    if workers:
        assert "crashed while running 'test_hangs.py::test_hangs'" in output, output
