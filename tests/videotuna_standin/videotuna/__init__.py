"""A tiny stand-in for VideoTuna (tests only): its module paths, names and tensor layouts, tiny modules behind them."""
