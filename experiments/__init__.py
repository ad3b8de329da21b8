"""The launchers around Flower (launch/) and the paper's studies (studies/). Import fl_ietagc/ only; strategies/ and
clients/ are loaded by Flower, never imported here."""
