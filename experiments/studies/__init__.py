"""The paper's studies as commands (fl-ietagc-study): plans and cost estimates, the runner that trains and evaluates
every run, the small-data and sd-finetune studies. Imports fl_ietagc/ and experiments/launch/.
"""
