"""The study's analysis: queries the tracking store, returns DataFrames and figures.

It never trains and never prints: `queries` finds the runs, `tables` builds one table per
item of the study, `plots` draws them, `report` assembles the report folder.
"""
