"""``sheri dashboard``: a live web page of a swarm, with history and metrics.

The model (:class:`SwarmModel`: MQTT messages and times in, state out, no I/O) is apart
from the shell (:func:`run_dashboard`: the follower of ``{swarm}/#``, the history in
SQLite, the page's pump and hypercorn's trio worker serving a Starlette app). The page
(``static/``) is plain HTML, CSS and JavaScript: no build step, nothing from the
internet. docs/dashboard.md says what it shows.
"""

from ._app import COOKIE as COOKIE
from ._app import Board as Board
from ._app import EventStream as EventStream
from ._app import Hub as Hub
from ._app import create_app as create_app
from ._errors import DashboardError as DashboardError
from ._errors import HistoryError as HistoryError
from ._history import History as History
from ._history import default_db_path as default_db_path
from ._metrics import LATENCY_BUCKETS as LATENCY_BUCKETS
from ._metrics import Metrics as Metrics
from ._model import SETTLED as SETTLED
from ._model import AgentRow as AgentRow
from ._model import Alert as Alert
from ._model import RetryNotAllowed as RetryNotAllowed
from ._model import SubmitError as SubmitError
from ._model import SwarmModel as SwarmModel
from ._model import TaskRow as TaskRow
from ._model import retry_submission as retry_submission
from ._model import submission_from_form as submission_from_form
from ._server import HISTORY_EVERY as HISTORY_EVERY
from ._server import PAGE_HZ as PAGE_HZ
from ._server import TOKEN_ENV as TOKEN_ENV
from ._server import DashboardOptions as DashboardOptions
from ._server import Running as Running
from ._server import run_dashboard as run_dashboard
