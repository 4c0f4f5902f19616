"""One function per user action: what the CLI (``workbench.cli``, an argparse + rich adapter) and
the terminal UI (``workbench.tui``, one generic job runner) both call.

Each action takes plain arguments and an optional ``progress`` callback receiving
:class:`workbench.progress.Progress` events, checks every input (files, headers, fields, outputs)
before any long work, writes its outputs atomically, returns a typed result and never prints.
Errors a user can fix are :class:`workbench.errors.WorkbenchError`, one line naming the file, the
field or tensor, and what was expected.

=======================  ===========================================
action                   function
=======================  ===========================================
open / resolve a model   ``ops.models.open_model``, ``ops.models.resolve``
import a GGUF            ``ops.models.import_gguf``
prepare the default      ``ops.models.prepare_default``
list / describe models   ``ops.models.list_models``, ``ops.models.model_info``
merge                    ``ops.merge.merge`` (``as_lora=BASE, rank=R``: the merge as a LoRA adapter)
extract a LoRA adapter   ``ops.lora.extract_lora``
mixture of experts       ``ops.moe.moe`` (mergekit-moe's config: dense experts -> Mixtral / Qwen2-MoE)
validate a recipe        ``ops.merge.validate``
export a run's recipe    ``ops.merge.export_recipe`` (``ops.merge.recipe_source``: file or run)
evaluate                 ``ops.evaluate.evaluate``
build the zoo            ``ops.zoo.build``, ``ops.zoo.status``
seeded variants          ``ops.variants.ensure_default_variants``, ``ops.variants.variant_search_spec``
                         (the default model's variants and a search over them that needs no zoo)
search (start, resume)   ``ops.search.open_search`` (merge or quantization), ``ops.search.front``
recover front points     ``ops.qsearch.recover_points``
quantize                 ``ops.quant.quantize``
recover                  ``ops.quant.recover``
export (4 formats)       ``ops.quant.export``
quantize+recover+export  ``ops.quant.quantize_recover_export`` (the UI's one-click flow)
=======================  ===========================================

Modules are imported on use (``from workbench.ops import merge``): torch loads only when an
action needs it.
"""
