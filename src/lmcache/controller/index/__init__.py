"""Options of the controller's chunk index (``controller_index`` config group of the controller app)."""
