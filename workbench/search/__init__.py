"""workbench.search"""
