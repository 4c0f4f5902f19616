"""The search builders: a form over the current screen that composes a search spec, checks it at
every change (the spec checker's one-line error shows under the field it names), saves it as YAML
in ``recipes/`` and hands it back to be started. Opening a spec fills the form.

The form <-> spec logic is :mod:`workbench.tui.specform` (plain functions); these screens only move
values between widgets and a form dataclass. ``MergeBuilderScreen`` serves Search (ctrl+e),
``QuantBuilderScreen`` Quant search (ctrl+e). A spec of the other kind, given or opened, goes to
the builder of its kind on the screen that runs it (:func:`open_in_its_builder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Checkbox, Collapsible, Input, Label, Select, SelectionList

from workbench.tui import specform as sf
from workbench.tui.jobs import error_text
from workbench.tui.messages import LmEvalChecked, ModelsKnown
from workbench.tui.screens.base import guarded

# (form attribute, caption, widget kind, choices) of the fields read and written one to one
Simple = tuple[str, str, str, tuple]

SCREEN_OF_KIND = {"merge": "search", "quantization": "qsearch"}   # the app mode that runs each kind


@dataclass
class OtherKind:
    """A builder's result: the spec opened is of the other kind (``kind``), for that kind's builder."""

    path: Path
    kind: str


def readable_kind(path: Path) -> str | None:
    """The spec's kind, or None when it does not read (the form then shows why)."""
    from workbench.quant.search.spec import spec_kind

    try:
        return spec_kind(path)
    except Exception:  # noqa: BLE001
        return None


def open_in_its_builder(app, other: OtherKind) -> None:
    """Switch to the screen that runs ``other``'s kind and open its builder on the spec."""
    def build() -> None:
        app.screen.build_from(other.path)

    app.switch_mode(SCREEN_OF_KIND[other.kind])
    app.call_after_refresh(build)


def push_builder(app, builder: type["SpecBuilderScreen"], path: Path | None, done) -> None:
    """Open ``builder`` on ``path`` (None: a blank form), or, for a spec of the other kind, that kind's
    builder on the screen that runs it; ``done(saved path, start)`` when the form is saved."""
    kind = readable_kind(path) if path is not None else None
    if kind is not None and kind != builder.KIND:
        open_in_its_builder(app, OtherKind(path, kind))
        return

    def built(result) -> None:
        if isinstance(result, OtherKind):   # a spec of the other kind opened in the form
            open_in_its_builder(app, result)
        elif result is not None:
            done(*result)

    app.push_screen(builder(path), built)


def dom_id(key: str) -> str:
    return key.replace(".", "-")


def field_box(key: str, caption: str, widget) -> Vertical:
    """A caption, the field's widget, and under it the line where its error shows."""
    return Vertical(Horizontal(Label(caption, classes="field-caption", markup=False), widget, classes="field-row"),
                    Label("", id=f"e-{dom_id(key)}", classes="field-error", markup=False), classes="field")


def simple_widget(key: str, kind: str, choices: tuple, suggest: list[str] | None = None):
    wid = f"f-{dom_id(key)}"
    if kind == "check":
        return Checkbox("yes", id=wid)
    if kind == "select":
        return Select([(str(c) or "auto", c) for c in choices], allow_blank=False, id=wid)
    return Input(id=wid, suggester=SuggestFromList(suggest, case_sensitive=True) if suggest else None)


def add_model_row() -> ComposeResult:
    with Horizontal(classes="controls"):
        yield Input(id="b-add-model", placeholder="add a model by path (a directory, a .gguf, BASE+ADAPTER)")
        yield Button("Add model", id="b-add")


class SpecBuilderScreen(ModalScreen[tuple[Path, bool] | OtherKind | None]):
    """Dismissed with (saved spec path, start it), ``OtherKind`` (a spec of the other kind was
    opened) or None (cancelled)."""

    TITLE_TEXT = "Search builder"
    KIND = "merge"
    SIMPLE: tuple[Simple, ...] = ()
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save(False)", "Save", priority=True),
                Binding("ctrl+r", "save(True)", "Save and start", priority=True)]

    def __init__(self, spec_path: str | Path | None = None) -> None:
        super().__init__()
        self.spec_path = Path(spec_path).expanduser() if spec_path else None
        self.known: list[str] = []   # model references offered (home names, then paths)
        self.error: sf.FieldError | None = None
        self.spec = None             # the last form that checked
        self._ready = False
        self.lm_eval_checked: dict[tuple[str, str], str | None] = {}   # (ref, options) -> problem
        self._lm_eval_pending: set[tuple[str, str]] = set()

    # --- what each kind says ----------------------------------------------------------------
    def new_form(self):
        raise NotImplementedError

    def load_form(self, path: Path):
        raise NotImplementedError

    def check(self, form):
        raise NotImplementedError

    def form_dict(self, form) -> dict:
        raise NotImplementedError

    def compose_form(self) -> ComposeResult:
        yield from ()

    def suggestions(self, key: str) -> list[str] | None:
        return None

    # --- layout -----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Vertical(id="builder-box"):
            yield Label(self.TITLE_TEXT, classes="section", markup=False)
            with Horizontal(classes="controls"):
                yield Input(str(self.spec_path or ""), id="b-open-path", placeholder="a spec file to open into the form")
                yield Button("Open", id="b-open")
            with VerticalScroll(id="builder-form"):
                yield from self.compose_form()
            yield Label("", id="e-spec", classes="field-error", markup=False)
            with Horizontal(classes="controls"):
                yield Input(id="b-save-path", placeholder="save as (blank: recipes/<name>-search.yml)")
                yield Button("Save", id="b-save", variant="primary")
                yield Button("Save and start", id="b-start", variant="success")
                yield Button("Cancel", id="b-cancel")

    def simple_box(self, key: str) -> Vertical:
        _, caption, kind, choices = next(s for s in self.SIMPLE if s[0] == key)
        return field_box(key, caption, simple_widget(key, kind, choices, self.suggestions(key)))

    @guarded
    async def on_mount(self) -> None:
        form = self.new_form()
        if self.spec_path is not None:   # of this kind: push_builder sends the other kind elsewhere
            try:
                form = self.load_form(self.spec_path)
            except Exception as e:  # noqa: BLE001 - a spec that does not load opens a blank form
                self.app.error(error_text(e), title="open spec")
        await self.fill(form)
        self.list_models()

    # --- models the workbench knows -----------------------------------------------------------
    @work(thread=True, exclusive=True, group="builder-models", exit_on_error=False, description="list models")
    def list_models(self) -> None:
        from workbench.home import models_dir
        from workbench.ops.models import list_models

        try:
            rows = list_models()
        except Exception as e:  # noqa: BLE001
            self.app.call_from_thread(self.app.error, error_text(e), "list models")
            return
        home = models_dir().absolute()
        refs = [r["name"] if Path(r["path"]).absolute().parent == home else r["path"]
                for r in rows if "error" not in r and r.get("path")]
        self.post_message(ModelsKnown(list(dict.fromkeys(refs))))

    @guarded
    async def on_models_known(self, message: ModelsKnown) -> None:
        form = self.read()
        self.known = list(dict.fromkeys([*message.models, *self.known]))
        await self.fill(form)

    def offer(self, refs) -> None:
        """Make sure these model references are among the options."""
        self.known += [r for r in refs if r and r not in self.known]

    # --- form <-> widgets ---------------------------------------------------------------------
    def read_simple(self, form) -> None:
        for key, _, kind, _ in self.SIMPLE:
            w = self.query_one(f"#f-{dom_id(key)}")
            value = w.value
            if kind == "select":
                value = "" if w.is_blank() else str(value)
            setattr(form, key, value)

    def fill_simple(self, form) -> None:
        for key, _, kind, choices in self.SIMPLE:
            w = self.query_one(f"#f-{dom_id(key)}")
            value = getattr(form, key)
            if kind == "select" and value not in choices:
                continue  # a value the spec checker refuses keeps the widget's; the check names it
            w.value = value

    def read(self):
        raise NotImplementedError

    async def fill(self, form) -> None:
        raise NotImplementedError

    # --- checking -----------------------------------------------------------------------------
    def validate(self) -> sf.FieldError | None:
        """Check the form now; show the error (if any) under its field; return it."""
        if not self._ready:
            return None
        try:
            form = self.read()
        except NoMatches:  # rows being rebuilt
            return None
        try:
            self.spec, self.error = self.check(form)
        except Exception as e:  # noqa: BLE001 - a checker's own failure is still shown, never raised
            self.spec, self.error = None, sf.FieldError("spec", error_text(e))
        if self.error is None and self.spec is not None:
            self.error = self.lm_eval_error(self.spec)
            if self.error is not None:
                self.spec = None
        for label in self.query(".field-error").results(Label):
            label.update("")
            label.remove_class("-shown")
        if self.error is not None:
            try:
                label = self.query_one(f"#e-{dom_id(self.error.field)}", Label)
            except NoMatches:
                label = self.query_one("#e-spec", Label)
            label.update(self.error.text)
            label.add_class("-shown")
        return self.error

    def lm_eval_error(self, spec) -> sf.FieldError | None:
        """The first lm-eval task of ``spec`` known not to load; the ones not checked yet are
        checked in a worker (the form checks again when each answer comes)."""
        import json

        options = json.dumps(spec.lm_eval.to_dict(), sort_keys=True)
        for field_name, ref in sf.lm_eval_refs(spec):
            key = (ref, options)
            if key not in self.lm_eval_checked:
                if key not in self._lm_eval_pending:
                    self._lm_eval_pending.add(key)
                    self.check_lm_eval(key, spec.lm_eval)
            elif self.lm_eval_checked[key] is not None:
                return sf.FieldError(field_name, self.lm_eval_checked[key])
        return None

    def lm_eval_pending(self) -> bool:
        return bool(self._lm_eval_pending)

    @work(thread=True, group="builder-lm-eval", exit_on_error=False, description="check an lm-eval task")
    def check_lm_eval(self, key: tuple[str, str], options) -> None:
        from workbench.eval.lm_eval_tasks import lm_eval_problem

        self.post_message(LmEvalChecked(key, lm_eval_problem(key[0], options)))

    def on_lm_eval_checked(self, message: LmEvalChecked) -> None:
        self._lm_eval_pending.discard(message.key)
        self.lm_eval_checked[message.key] = message.problem
        self.validate()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id not in ("b-open-path", "b-save-path", "b-add-model"):
            self.validate()

    def on_checkbox_changed(self) -> None:
        self.validate()

    @on(Select.Changed)
    def _select_changed(self) -> None:
        self.validate()

    @on(SelectionList.SelectedChanged)
    def _selection_changed(self) -> None:
        self.validate()

    # --- actions ------------------------------------------------------------------------------
    @on(Button.Pressed, "#b-add")
    @on(Input.Submitted, "#b-add-model")
    @guarded
    async def _add_model(self) -> None:
        raw = self.query_one("#b-add-model", Input).value.strip()
        if not raw:
            self.app.error("type a model path first")
            return
        why = sf.model_problem(raw)
        if why is not None:
            self.app.error(why, title="add model")
            return
        form = self.read()
        self.offer([raw])
        await self.fill(form)
        self.query_one("#b-add-model", Input).value = ""

    @on(Button.Pressed, "#b-open")
    @on(Input.Submitted, "#b-open-path")
    @guarded
    async def _open(self) -> None:
        raw = self.query_one("#b-open-path", Input).value.strip()
        if not raw:
            self.app.error("type the path of a spec to open first")
            return
        if self.hand_over(Path(raw).expanduser()):
            return
        try:
            form = self.load_form(Path(raw).expanduser())
        except Exception as e:  # noqa: BLE001
            self.app.error(error_text(e), title="open spec")
            return
        self.spec_path = Path(raw).expanduser()
        await self.fill(form)
        self.app.notify(f"opened {raw}", markup=False)

    def hand_over(self, path: Path) -> bool:
        """Dismiss with ``OtherKind`` when ``path`` is a spec of the other kind."""
        kind = readable_kind(path)
        if kind is None or kind == self.KIND:
            return False
        self.dismiss(OtherKind(path, kind))
        return True

    @on(Button.Pressed, "#b-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#b-save")
    def _save_pressed(self) -> None:
        self.action_save(False)

    @on(Button.Pressed, "#b-start")
    def _start_pressed(self) -> None:
        self.action_save(True)

    @guarded
    def action_save(self, start: bool) -> None:
        from workbench.atomic import occupied
        from workbench.tui.screens.confirm import ConfirmScreen

        error = self.validate()
        if error is not None:
            self.app.error(f"fix the form first: {error.text}", title="spec not saved")
            return
        if self.lm_eval_pending():
            self.app.notify("the lm-eval tasks are being checked; save again in a moment", severity="warning",
                            markup=False)
            return
        form = self.read()
        raw = self.query_one("#b-save-path", Input).value.strip()
        path = Path(raw).expanduser() if raw else sf.default_spec_path(form.name)

        def write(yes: bool = True) -> None:
            if not yes:
                self.app.notify("nothing replaced", severity="warning", markup=False)
                return
            try:
                saved = sf.save_spec(self.form_dict(form), path)
            except Exception as e:  # noqa: BLE001
                self.app.error(error_text(e), title="spec not saved")
                return
            self.app.notify(f"search spec saved: {saved}", markup=False)
            self.dismiss((saved, start))

        if occupied(path):
            self.app.push_screen(ConfirmScreen(f"{path} exists. Replace it with this spec?"), write)
        else:
            write()


# the spec's `lm_eval:` mapping, for tasks named lm_eval:NAME (in both builders)
LM_EVAL_SIMPLE = (("lm_eval_include_path", "lm-eval task dirs", "input", ()),
                  ("lm_eval_seed", "lm-eval split seed", "input", ()),
                  ("lm_eval_search_docs", "lm-eval search docs", "input", ()),
                  ("lm_eval_heldout_docs", "lm-eval held-out docs", "input", ()),
                  ("lm_eval_num_fewshot", "lm-eval few-shot", "input", ()),
                  ("lm_eval_chat_template", "lm-eval chat template", "check", ()))
LM_EVAL_KEYS = tuple(key for key, *_ in LM_EVAL_SIMPLE)


def lm_eval_section(builder) -> ComposeResult:
    with Collapsible(title="lm-eval tasks: your task directories, splits, few-shot, chat template", collapsed=True):
        for key in LM_EVAL_KEYS:
            yield builder.simple_box(key)


class MergeBuilderScreen(SpecBuilderScreen):
    TITLE_TEXT = "Merge search builder: sources, method, what evolves, objective, budget"
    SIMPLE = (("name", "name", "input", ()),
              ("granularity", "granularity", "input", ()),
              ("split_attention_mlp", "attention / MLP apart", "check", ()),
              ("report_tasks", "report tasks", "input", ()),
              ("generations", "generations", "input", ()), ("population", "population", "input", ()),
              ("max_evaluations", "max evaluations", "input", ()), ("max_minutes", "max minutes", "input", ()),
              ("seed", "seed", "input", ()), ("limit", "items per task", "input", ()),
              ("racing", "racing", "check", ()), ("sigma0", "sigma0", "input", ()),
              ("dtype", "source dtype (auto: bf16 on GPU, fp32 on CPU)", "select", ("", "float32", "bfloat16", "float16", "float64")),
              ("eval_dtype", "scoring dtype", "select", ("bfloat16", "float32")),
              ("batch_size", "batch size", "input", ()), ("quantize", "quantize (joint)", "input", ()),
              ("grid_baseline", "grid baseline in the report", "check", ()), *LM_EVAL_SIMPLE)

    def __init__(self, spec_path: str | Path | None = None) -> None:
        super().__init__(spec_path)
        self.method_shown: str | None = None
        self.param_names: list[str] = []
        self.objective_count = 0

    def new_form(self) -> sf.MergeForm:
        return sf.MergeForm(params=sf.default_params("ties"))

    def load_form(self, path: Path) -> sf.MergeForm:
        from workbench.search.spec import load_spec

        return sf.merge_form_from_spec(load_spec(path))

    def check(self, form):
        return sf.check_merge_form(form)

    def form_dict(self, form) -> dict:
        return sf.merge_form_dict(form)

    def suggestions(self, key: str) -> list[str] | None:
        if key == "granularity":
            return ["global", "per_layer"]
        if key == "report_tasks":
            return sf.builtin_tasks()
        return None

    def compose_form(self) -> ComposeResult:
        yield self.simple_box("name")
        yield field_box("base_model", "base model", Select([], prompt="none", id="f-base_model"))
        yield field_box("models", "sources", SelectionList(id="f-models"))
        yield from add_model_row()
        yield field_box("merge_method", "method", Select([(m, m) for m in sf.searchable_methods()],
                                                         allow_blank=False, id="f-merge_method"))
        yield Label("parameters: tick to evolve within [low, high]; a shared one not evolved may be fixed",
                    classes="field-note", markup=False)
        yield Vertical(id="params")
        yield Label("", id="e-evolve", classes="field-error", markup=False)
        for key in ("granularity", "split_attention_mlp"):
            yield self.simple_box(key)
        yield Label("objective: tasks (built-in names, task files, lm_eval:NAME) and weights",
                    classes="field-note", markup=False)
        yield Vertical(id="objectives")
        yield Label("", id="e-objective", classes="field-error", markup=False)
        yield Button("Add task", id="b-add-task")
        for key in ("report_tasks", "generations", "population", "max_evaluations", "max_minutes", "seed", "limit"):
            yield self.simple_box(key)
        with Collapsible(title="more: racing, step size, dtypes, batch, joint quantization, grid", collapsed=True):
            for key in ("racing", "sigma0", "dtype", "eval_dtype", "batch_size", "quantize", "grid_baseline"):
                yield self.simple_box(key)
        yield from lm_eval_section(self)

    # --- rows ---------------------------------------------------------------------------------
    def param_row(self, row: sf.ParamRow, info: sf.ParamInfo | None) -> Vertical:
        """[evolve] name  low  high  (fixed, shared ones)  range and help; a bool is only fixed."""
        shared = info.shared if info else True
        numeric = info is None or info.kind != "bool"
        caption = row.name + ("" if shared else " (per model)")
        items = [Checkbox(caption, row.evolve and numeric, classes="p-evolve", disabled=not numeric)]
        if numeric:
            items += [Input(row.low, placeholder="low", classes="p-low"),
                      Input(row.high, placeholder="high", classes="p-high")]
        if shared:
            default = sf.show(info.default) if info else ""
            items.append(Input(row.fixed, placeholder=f"default {default}" if default else "fixed", classes="p-fixed"))
        bounds = "" if info is None or (info.low is None and info.high is None) else \
            f"[{sf.show(info.low) or '-inf'}, {sf.show(info.high) or 'inf'}] "
        items.append(Label(bounds + (info.help if info else ""), classes="p-help", markup=False))
        return Vertical(Horizontal(*items, classes="param-row"),
                        Label("", id=f"e-evolve-{row.name}", classes="field-error", markup=False),
                        id=f"p-{row.name}", classes="field")

    def objective_row(self, i: int, row: sf.ObjectiveRow) -> Vertical:
        return Vertical(Horizontal(Input(row.task, placeholder="task: zoo-kl, path/to/task.yml, lm_eval:arc_easy",
                                         classes="o-task", suggester=SuggestFromList(sf.builtin_tasks())),
                                   Input(row.weight, placeholder="weight", classes="o-weight"),
                                   Button("remove", classes="o-remove", name=str(i)), classes="objective-row"),
                        Label("", id=f"e-objective-{i}", classes="field-error", markup=False), id=f"o-{i}",
                        classes="field")

    async def show_params(self, method: str, rows: list[sf.ParamRow]) -> None:
        info = {p.name: p for p in sf.method_params(method)}
        box = self.query_one("#params", Vertical)
        self._ready = False
        await box.remove_children()
        await box.mount_all([self.param_row(r, info.get(r.name)) for r in rows])
        self.method_shown, self.param_names = method, [r.name for r in rows]
        self._ready = True

    async def show_objectives(self, rows: list[sf.ObjectiveRow]) -> None:
        box = self.query_one("#objectives", Vertical)
        self._ready = False
        await box.remove_children()
        await box.mount_all([self.objective_row(i, r) for i, r in enumerate(rows)])
        self.objective_count = len(rows)
        self._ready = True

    # --- form <-> widgets -----------------------------------------------------------------------
    def read(self) -> sf.MergeForm:
        form = sf.MergeForm()
        self.read_simple(form)
        base = self.query_one("#f-base_model", Select)
        form.base_model = "" if base.is_blank() else str(base.value)
        form.models = [str(v) for v in self.query_one("#f-models", SelectionList).selected]
        form.merge_method = str(self.query_one("#f-merge_method", Select).value)
        form.params = []
        for name in self.param_names:
            row = self.query_one(f"#p-{name}")

            def text(cls: str) -> str:
                return next((w.value for w in row.query(cls).results(Input)), "")

            form.params.append(sf.ParamRow(name, row.query_one(".p-evolve", Checkbox).value, text(".p-low"),
                                           text(".p-high"), text(".p-fixed")))
        form.objective = [sf.ObjectiveRow(self.query_one(f"#o-{i} .o-task", Input).value,
                                          self.query_one(f"#o-{i} .o-weight", Input).value)
                          for i in range(self.objective_count)]
        return form

    async def fill(self, form: sf.MergeForm) -> None:
        self._ready = False
        self.offer([form.base_model, *form.models])
        self.fill_simple(form)
        base = self.query_one("#f-base_model", Select)
        base.set_options([(m, m) for m in self.known])
        if form.base_model:
            base.value = form.base_model
        models = self.query_one("#f-models", SelectionList)
        models.clear_options()
        models.add_options([(m, m) for m in self.known])
        for m in form.models:
            models.select(m)
        await self.show_params(form.merge_method, form.params)
        self.query_one("#f-merge_method", Select).value = form.merge_method
        await self.show_objectives(form.objective)
        self._ready = True
        self.validate()

    # --- events -----------------------------------------------------------------------------
    @on(Select.Changed, "#f-merge_method")
    @guarded
    async def _method_changed(self) -> None:
        select = self.query_one("#f-merge_method", Select)  # the event's value may be stale by now
        value = select.value
        if select.is_blank() or value == self.method_shown:
            return
        await self.show_params(str(value), sf.default_params(str(value)))
        self.validate()

    @on(Button.Pressed, "#b-add-task")
    @guarded
    async def _add_task(self) -> None:
        form = self.read()
        await self.show_objectives([*form.objective, sf.ObjectiveRow()])
        self.validate()

    @on(Button.Pressed, ".o-remove")
    @guarded
    async def _remove_task(self, event: Button.Pressed) -> None:
        form = self.read()
        del form.objective[int(event.button.name or 0)]
        await self.show_objectives(form.objective)
        self.validate()


class QuantBuilderScreen(SpecBuilderScreen):
    TITLE_TEXT = "Quantization search builder: formats, ranks, budgets, fitness"
    KIND = "quantization"
    SIMPLE = (("name", "name", "input", ()),
              ("formats", "formats (bits/group[/method])", "input", ()),
              ("ranks", "adapter ranks", "input", ()),
              ("lora_alpha", "LoRA alpha", "input", ()), ("lora_init", "LoRA init", "select", ("svd", "zeros")),
              ("skip", "skip (patterns)", "input", ()),
              ("granularity", "granularity", "select", ("per_layer", "per_block", "per_type")),
              ("targets", "targets (bits per weight)", "input", ()),
              ("fitness", "fitness (kl or a task)", "input", ()), ("seq_len", "tokens per window", "input", ()),
              ("stages", "stages (windows:keep)", "input", ()),
              ("generations", "generations", "input", ()), ("offspring", "offspring", "input", ()),
              ("max_minutes", "max minutes", "input", ()),
              ("optimizer", "optimizer", "select", ("levelswitch", "cma")), ("seed", "seed", "input", ()),
              ("heldout_windows", "held-out windows", "input", ()), ("heldout_task", "held-out task", "input", ()),
              *LM_EVAL_SIMPLE)

    def new_form(self) -> sf.QuantForm:
        from workbench.home import DEFAULT_MODEL_NAME

        return sf.QuantForm(model=DEFAULT_MODEL_NAME)

    def load_form(self, path: Path) -> sf.QuantForm:
        from workbench.quant.search.spec import load_quant_search_spec

        return sf.quant_form_from_spec(load_quant_search_spec(path))

    def check(self, form):
        return sf.check_quant_form(form)

    def form_dict(self, form) -> dict:
        return sf.quant_form_dict(form)

    def suggestions(self, key: str) -> list[str] | None:
        if key in ("fitness", "heldout_task"):
            return ["kl", *sf.builtin_tasks()] if key == "fitness" else sf.builtin_tasks()
        return None

    def compose_form(self) -> ComposeResult:
        yield self.simple_box("name")
        yield field_box("model", "model", Select([], prompt="choose a model", id="f-model"))
        yield from add_model_row()
        for key, *_ in self.SIMPLE[1:]:
            if key not in LM_EVAL_KEYS:
                yield self.simple_box(key)
        yield from lm_eval_section(self)

    def read(self) -> sf.QuantForm:
        form = sf.QuantForm()
        self.read_simple(form)
        model = self.query_one("#f-model", Select)
        form.model = "" if model.is_blank() else str(model.value)
        return form

    async def fill(self, form: sf.QuantForm) -> None:
        self._ready = False
        self.offer([form.model])
        self.fill_simple(form)
        model = self.query_one("#f-model", Select)
        model.set_options([(m, m) for m in self.known])
        if form.model:
            model.value = form.model
        self._ready = True
        self.validate()

