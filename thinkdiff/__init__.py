import logging

# diffusers imports transformers' CLIP and SigLIP image processors (for IP-Adapters, unused here),
# and without torchvision transformers then warns, on every run, that it falls back to their PIL
# versions: the versions this project uses anyway. Set here, before any module imports diffusers.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision" not in record.getMessage()
)
