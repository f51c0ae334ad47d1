# Runs first at every reset. Keep it minimal: a mistake here is hard to recover from
# without reflashing. The application starts in main.py.
import gc

try:
    import esp

    esp.osdebug(None)  # no ROM debug output on the serial console
except ImportError:
    pass
gc.collect()
