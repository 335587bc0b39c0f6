"""One module per screen; modals live beside the screen that opens them."""
