"""The admin web console (issue 13): sign-in, sign-out and the signed-in home page."""
