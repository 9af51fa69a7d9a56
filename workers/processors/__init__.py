from workers.processors.sd3 import SD3SinkAttnProcessor, install_sd3_processors
from workers.processors.sdxl import SDXLSinkAttnProcessor, install_sdxl_processors

__all__ = ["SD3SinkAttnProcessor", "install_sd3_processors", "SDXLSinkAttnProcessor", "install_sdxl_processors"]
