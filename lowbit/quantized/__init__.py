"""The quantized model lowbit makes and saves: modules holding weights on a grid, and the module swap."""
