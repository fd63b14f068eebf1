"""`python -m kdx.models [kdx|torchvision|timm]` lists the model names build_model accepts."""
import sys

from kdx.models import list_models

for name in list_models(sys.argv[1] if len(sys.argv) > 1 else "kdx"):
    print(name)
