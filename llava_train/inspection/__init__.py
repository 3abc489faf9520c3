"""`llava preview` and `llava doctor`: seeing and checking data exactly as it will be trained on."""
