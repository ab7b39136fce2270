"""Model families, one readable file each. The registry (bigmodel.registry) maps names to them."""
