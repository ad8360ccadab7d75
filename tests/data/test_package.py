import subprocess
import sys
from pathlib import Path

import umec_lightning.data as data


def test_every_export_resolves():
    assert set(data.__all__) == set(data._EXPORTS)
    for name in data.__all__:
        assert getattr(data, name) is not None
    assert data.DataError is data.core.DataError and data.cache.build_cache is data.build_cache


def test_import_of_umec_lightning_registers_the_resolver():
    # a fresh process: train.py composes the config after importing umec_lightning, nothing else
    code = "import umec_lightning; from omegaconf import OmegaConf; assert OmegaConf.has_resolver('umec_data_name')"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
