"""The app inside the test process behind FastAPI's TestClient (MONAI Label's own test recipe, monailabel.md §7)."""

import json
import os
import shutil
import sys
from pathlib import Path

from fastapi.testclient import TestClient

APP = Path(__file__).resolve().parents[1] / "apps" / "qunet"


def app_client(studies: Path, conf: dict[str, str]) -> TestClient:
    """The app over `studies`, from its own copy beside that folder: its model and logs never touch the checkout."""
    from monailabel.config import settings

    app_dir = studies.parent / "app"
    if not app_dir.exists():
        shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    settings.MONAI_LABEL_APP_DIR = str(app_dir)
    settings.MONAI_LABEL_STUDIES = str(studies)
    settings.MONAI_LABEL_APP_CONF = {"server_mode": "true", **conf}
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
    settings.MONAI_LABEL_TRACKING_ENABLED = False
    settings.MONAI_LABEL_SESSION_PATH = str(studies.parent / "sessions")
    for k, v in settings.model_dump().items():
        if v is None:  # "None" as a string would reach servers started later in the session
            os.environ.pop(k, None)
            continue
        os.environ[k] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    if str(APP) not in sys.path:
        sys.path.insert(0, str(APP))  # the app's `qunet_app` package, as start_server puts the app dir on PYTHONPATH
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP), os.environ.get("PYTHONPATH", "")]))

    from monailabel.app import app
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    clear_cache()
    app_instance().server_mode(True)
    return TestClient(app)
