"""data/phantom"""
