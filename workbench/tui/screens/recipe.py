"""Recipe: open, edit, validate (errors shown at their line) and merge a recipe."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Checkbox, Footer, Input, Label, Select, TextArea
from textual.widgets.text_area import Selection

from workbench.tui.jobs import default_merge_out, error_line, error_text, example_recipes
from workbench.tui.messages import JobFailed, JobFinished
from workbench.tui.screens.base import WorkbenchScreen, guarded
from workbench.tui.widgets import JobStatus, NavBar

TEMPLATE = """\
# A mergekit-compatible recipe. Open one (recipes/*.yml) or write it here, then
# Validate (ctrl+g) and Merge (ctrl+r).
merge_method: ties
base_model: SmolLM2-135M-Instruct
models:
  - model: SmolLM2-135M-Instruct-variant-a
    parameters: {weight: 0.5, density: 0.5}
  - model: SmolLM2-135M-Instruct-variant-b
    parameters: {weight: 0.5, density: 0.5}
parameters: {normalize: true}
dtype: float32
"""


def yaml_editor() -> TextArea:
    editor = TextArea.code_editor(TEMPLATE, id="editor", soft_wrap=False)
    with contextlib.suppress(Exception):  # highlighting needs textual[syntax]; else plain text
        from textual._tree_sitter import TREE_SITTER

        if TREE_SITTER and "yaml" in editor.available_languages:
            editor.language = "yaml"
    return editor


class RecipeScreen(WorkbenchScreen):
    MODE = "recipe"
    BINDINGS = [
        Binding("ctrl+o", "open", "Open", id="recipe.open"),
        Binding("ctrl+s", "save", "Save", id="recipe.save"),
        Binding("ctrl+g", "validate", "Validate", id="recipe.validate",
                tooltip="check the recipe against its models (workbench recipe validate)"),
        Binding("ctrl+r", "merge", "Merge", id="recipe.merge", tooltip="run the merge (workbench merge)"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.result: Path | None = None

    def compose(self) -> ComposeResult:
        yield NavBar("recipe")
        with Horizontal(classes="controls"):
            yield Select([(p.name, str(p)) for p in example_recipes()], prompt="example recipes", id="recipe-select")
            yield Input(id="recipe-path", placeholder="recipe file (blank: the editor's text, unsaved)")
            yield Button("Open", id="open")
            yield Button("Save", id="save")
        yield yaml_editor()
        yield Label(Text(""), id="recipe-error")
        with Horizontal(classes="controls"):
            yield Button("Validate", id="validate", variant="primary")
            yield Input(id="merge-out", placeholder="output directory (blank: $WORKBENCH_HOME/merges/<recipe>)")
            yield Checkbox("overwrite", id="overwrite")
            yield Button("Merge", id="merge", variant="success")
        yield JobStatus(idle="no merge running", id="merge-job")
        yield Label(Text(""), id="merge-result")
        yield Footer(compact=True)

    # --- helpers ----------------------------------------------------------------------------
    @property
    def editor(self) -> TextArea:
        return self.query_one("#editor", TextArea)

    def source(self) -> str:
        path = self.query_one("#recipe-path", Input).value.strip()
        return str(Path(path).expanduser()) if path else "<editor>"

    def clear_error(self) -> None:
        label = self.query_one("#recipe-error", Label)
        label.update(Text(""))
        label.remove_class("error")

    def show_error(self, message: str) -> None:
        """The error under the editor; the cursor moves to its line, which is selected."""
        label = self.query_one("#recipe-error", Label)
        label.update(Text(message))
        label.add_class("error")
        line = error_line(message, self.source())
        if line is not None and 1 <= line <= self.editor.document.line_count:
            row = line - 1
            self.editor.selection = Selection((row, 0), (row, len(self.editor.document.get_line(row))))
            self.editor.scroll_cursor_visible(center=True)
        self.error(message, title="recipe")

    def parse(self):
        """The editor's recipe, or None (with the error shown)."""
        from workbench.merge.recipe import parse_recipe

        self.clear_error()
        try:
            return parse_recipe(self.editor.text, source=self.source())
        except Exception as e:  # noqa: BLE001
            self.show_error(error_text(e))
            return None

    # --- open / save ------------------------------------------------------------------------
    @on(Select.Changed, "#recipe-select")
    @guarded
    def _picked(self, event: Select.Changed) -> None:
        if not event.select.is_blank():
            self.query_one("#recipe-path", Input).value = str(event.value)
            self.action_open()

    @on(Button.Pressed, "#open")
    @on(Input.Submitted, "#recipe-path")
    @guarded
    def action_open(self) -> None:
        path = Path(self.query_one("#recipe-path", Input).value.strip()).expanduser()
        if not path.is_file():
            self.error(f"{path}: recipe file not found")
            return
        try:
            self.editor.load_text(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            self.error(f"{path}: {e}")
            return
        self.clear_error()
        self.info(f"opened {path}")

    @on(Button.Pressed, "#save")
    @guarded
    def action_save(self) -> None:
        raw = self.query_one("#recipe-path", Input).value.strip()
        if not raw:
            self.error("give a file name in the recipe path field first")
            return
        path = Path(raw).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.editor.text)
        except OSError as e:
            self.error(f"{path}: {e}")
            return
        self.info(f"saved {path}")

    # --- validate ---------------------------------------------------------------------------
    @on(Button.Pressed, "#validate")
    @guarded
    def action_validate(self) -> None:
        recipe = self.parse()
        if recipe is not None:
            from workbench.ops.merge import validate

            self.query_one("#recipe-error", Label).update(Text("checking the models..."))
            self.run_job("validate", lambda progress: validate(recipe), threads=False,
                         done_text=lambda result: result.summary())

    # --- merge ------------------------------------------------------------------------------
    @on(Button.Pressed, "#merge")
    @guarded
    def action_merge(self) -> None:
        from workbench.ops.merge import merge

        if self.job_running("merge"):
            self.warn("a merge is running")
            return
        recipe = self.parse()
        if recipe is None:
            return
        raw = self.query_one("#merge-out", Input).value.strip()
        name = Path(self.source()).stem if self.source() != "<editor>" else (recipe.name or "recipe")
        out = Path(raw).expanduser() if raw else default_merge_out(name)
        overwrite = self.query_one("#overwrite", Checkbox).value

        def start() -> None:
            self.query_one("#merge-result", Label).update(Text(""))
            self.run_job("merge", lambda progress: merge(recipe, out, overwrite=overwrite, progress=progress),
                         status="#merge-job", buttons=("#merge",), start_text=f"merging into {out}...",
                         done_text=lambda r: f"merged {r.num_tensors} tensors into {r.out_dir} "
                                             f"({r.bytes_written / 1e6:.1f} MB) in {r.seconds:.1f} s")

        self.start_if_outputs_free([out], overwrite, start)

    # --- the end of a job -------------------------------------------------------------------
    def job_finished(self, message: JobFinished) -> None:
        if message.job == "validate":
            self.query_one("#recipe-error", Label).update(Text(f"ok: {message.text}", style="green"))
            self.info(f"recipe ok: {message.text}")
            return
        self.result = message.result.out_dir
        self.query_one("#merge-result", Label).update(Text(f"result: {self.result}", style="bold green"))
        self.info(message.text, title="merge done")

    def job_failed(self, message: JobFailed) -> None:
        self.show_error(message.error)
