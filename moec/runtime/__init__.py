"""Running artifacts: manifest reading, runners per backend, comparison of outputs.

Imports nothing from `moec.compiler` or `moec.passes`: a deployed artifact needs only this
package and its backend.
"""

from __future__ import annotations
