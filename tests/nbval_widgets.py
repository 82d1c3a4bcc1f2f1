"""pytest plugin of `make nbval`, two corrections that make a rerun behave like the notebook run it is compared with.

1. Outputs that an ipywidgets Output widget captures belong to the widget, not to the cell.

`interactive(f, ...)` draws its first figure inside its Output widget. JupyterLab and nbclient (which wrote the stored
runs) route every output whose parent message is the one the widget is capturing (its synced `msg_id`) into the widget;
nbval 0.11 has no such routing and adds them to the cell, so the rerun of a widget cell would show an extra figure
that the stored run keeps in the widget state. This plugin applies the same routing rule to nbval's message stream:
nothing else is dropped.

2. Cells run as a notebook front end runs them, stored in history (see `_execute_cell_input`).

Loaded with `-p nbval_widgets` (tests/ on PYTHONPATH)."""
from nbval.plugin import IPyNbFile

# the message types an Output widget captures (nbclient's output hook takes the same set)
CAPTURED = {"display_data", "execute_result", "stream", "error", "clear_output", "update_display_data"}


def _get_kernel_message(self, timeout=None, stream="iopub"):
    "The next kernel message, skipping outputs captured by an Output widget; track which widgets capture what."
    captures = self.__dict__.setdefault("_widget_captures", {})  # comm id -> msg_id the widget captures
    while True:
        msg = self.kernel.get_message(stream, timeout=timeout)
        if stream != "iopub":
            return msg
        kind = msg["msg_type"]
        if kind in ("comm_open", "comm_msg"):
            state = (msg["content"].get("data") or {}).get("state") or {}
            if "msg_id" in state:  # an Output widget starts (an id) or stops ("") capturing
                comm = msg["content"]["comm_id"]
                if state["msg_id"]:
                    captures[comm] = state["msg_id"]
                else:
                    captures.pop(comm, None)
            return msg
        if kind in CAPTURED and msg["parent_header"].get("msg_id") in captures.values():
            continue
        return msg


IPyNbFile.get_kernel_message = _get_kernel_message


# nbval 0.11 sends each cell with `store_history=False`. IPython then decides whether a trailing `;` silences the
# cell's result by looking at the last *stored* input, which is an earlier cell, so `ledger.claim(...);` shows a result
# in the rerun that the notebook (JupyterLab, nbclient: `store_history=True`) never shows. Send cells as a notebook does.
from nbval.kernel import RunningKernel


def _execute_cell_input(self, cell_input, allow_stdin=None):
    "Execute `cell_input` as a notebook front end does (stored in history); return the message id."
    return self.kc.execute(cell_input, store_history=True, allow_stdin=allow_stdin, stop_on_error=False)


RunningKernel.execute_cell_input = _execute_cell_input
