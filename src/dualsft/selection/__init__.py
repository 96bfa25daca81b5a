"""Selection: turning saved scores into a data subset and a parameter mask (docs/method.md §5 step 4, §7).

Public API:
    select_mask(scores, MaskSpec(...)) -> MaskSelection      top-k of φ_param: quotas, filters, units
    select_subset(data_scores, budget) -> SubsetSelection         top-b of signed φ_data
    refine_jointly(...) -> JointResult                        alternating mask/subset refinement
    save_mask / load_mask / apply_mask_to_grads / shira_mask_fn   the saved mask and its uses
    locate(name) -> ParamLocation                             layer index and module group of a name
The command `dualsft select` is dualsft.selection.select.
"""

from dualsft.selection.joint import JointResult, refine_jointly
from dualsft.selection.mask import apply_mask_to_grads, load_mask, save_mask, shira_mask_fn
from dualsft.selection.names import GROUPS, ParamLocation, locate
from dualsft.selection.policy import MaskSelection, MaskSpec, SubsetSelection, select_mask, select_subset

__all__ = ["GROUPS", "JointResult", "MaskSelection", "MaskSpec", "ParamLocation", "SubsetSelection",
           "apply_mask_to_grads", "load_mask", "locate", "refine_jointly", "save_mask", "select_mask",
           "select_subset", "shira_mask_fn"]
