"""The Microscope tab: ES modules and a style sheet that the browser loads as they are.

Installed as the package `tb_microscope.static` (see pyproject.toml) and served by the plugin's
`/static/` route. There is no build step, so a plain `pip install` gives a working tab.
"""
