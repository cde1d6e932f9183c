"""Developer tools: the static GPU report (`inspect`) and image metrics (`metrics`)."""
