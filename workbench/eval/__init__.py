"""Fast, trustworthy evaluation of in-memory models on task files (multiple choice, exact match,
perplexity, KL to a teacher), with racing against an incumbent for search loops."""

from workbench.eval.evaluator import TaskResult, evaluate, results_to_dict
from workbench.eval.taskfile import Task, TaskError, check_search_objective, load_task

__all__ = ["Task", "TaskError", "TaskResult", "check_search_objective", "evaluate", "load_task",
           "results_to_dict"]
