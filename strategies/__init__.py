"""The ServerApp and its aggregation strategies (Flower Message-API strategies with this app's round contract).
Imports fl_ietagc/ and nothing else of the app; Flower loads it (pyproject's serverapp)."""
