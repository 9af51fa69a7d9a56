from workers.processors.flux import FluxSinkAttnProcessor, install_flux_processors
from workers.processors.sd3 import SD3SinkAttnProcessor, install_sd3_processors
from workers.processors.sdxl import SDXLSinkAttnProcessor, install_pixart_processors, install_sdxl_processors

__all__ = [
    "SD3SinkAttnProcessor", "install_sd3_processors", "SDXLSinkAttnProcessor", "install_sdxl_processors",
    "install_pixart_processors", "FluxSinkAttnProcessor", "install_flux_processors",
]
