"""The operator console: server-rendered pages and a JSON API over PostgreSQL, as each
operator's own role (row-level security decides what they see), with images served from the
artifact store and the replay of dead letters.

`stampflow console` serves it alone; `stampflow up` and the demo start it beside the nodes.
"""

from stampflow.console.config import ConsoleConfig
from stampflow.console.server import ConsoleServer, start_console
from stampflow.console.web import create_app

__all__ = ["ConsoleConfig", "ConsoleServer", "create_app", "start_console"]
