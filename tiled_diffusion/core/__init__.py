"""The model-independent core: tiling geometry (`tiling`) and the LCM step (`lcm`)."""
