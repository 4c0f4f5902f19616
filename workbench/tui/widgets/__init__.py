"""Reusable widgets of the workbench UI."""

from workbench.tui.widgets.candidates import CandidateTable, Cell
from workbench.tui.widgets.fitness import FitnessChart
from workbench.tui.widgets.heatmap import HeatMap
from workbench.tui.widgets.job import JobStatus
from workbench.tui.widgets.nav import NavBar
from workbench.tui.widgets.report_chart import ReportChart

__all__ = ["CandidateTable", "Cell", "FitnessChart", "HeatMap", "JobStatus", "NavBar", "ReportChart"]
