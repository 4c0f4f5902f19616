"""workbench.merge"""
