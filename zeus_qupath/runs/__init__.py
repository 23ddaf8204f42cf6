"""A segmentation run over a cohort of slides, top down: :mod:`.run` (validate, skip what is done, execute,
write run.json) over :mod:`.discovery` (which slides), :mod:`.state` (which are done; locks), :mod:`.jobs` (what an
executor gets and returns), :mod:`.local_executor` / :mod:`.ray_executor` (where slides run) and :mod:`.summary`
(the end-of-run table). Kept free of imports so that importing one module loads only what it needs.
"""
