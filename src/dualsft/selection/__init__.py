"""Selection: turning saved scores into a data subset and a parameter mask."""
