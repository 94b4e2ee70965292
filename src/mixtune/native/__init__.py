"""Native PyTorch ports of models whose published checkpoints ship remote code (`trust_remote_code`).

Each port is a transformers config + `PreTrainedModel` + processor registered with transformers' Auto classes
for the checkpoint's own `model_type`, so the published folder loads by its own key names with no remote code.
Importing a port's package registers it; `mixtune.models.registry` imports them through their family files.
"""

from mixtune.native import qwen_vl  # noqa: E402,F401  (registers model_type "qwen")
from mixtune.native import visualglm  # noqa: E402,F401  (registers model_type "chatglm")
