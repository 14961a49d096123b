# A crossed-effects model written with odd formatting: every comment, blank line and odd
# space outside the rewritten statements must survive byte for byte.
"""Odd formatting: comments, trailing comments, weird spacing, blank lines, 2-space indent."""
import numpy  as np   # two spaces
import numpyro
import numpyro.distributions as dist
from numpyro import sample


ROW = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2])   # rows
COL = np.array( [0,1,0,1,0,1,1,0,1] )
Y   = np.array([1.1, 0.4, 2.0, 1.2, 0.3, -0.4, 0.5, 1.9, -0.2],
               dtype=np.float32)  # observations



def model( row, col, y = None ):
  """Docstring of the model."""
  # the grand mean
  mu=numpyro.sample( "mu",dist.Normal( 0. , 10. ) )   # trailing comment on mu

  sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0)); sigma_b = numpyro.sample("sigma_b", dist.HalfNormal(1.0))


  with numpyro.plate("rows", 3):   # plate comment
    # comment right above a
    a = sample( 'a' , fn = dist.Normal( 0. ,
                                        sigma_a ) )   # trailing comment on a
    # comment right below a

  with numpyro.plate("cols",2) :
    b = numpyro.sample(
        "b",  # a comment inside the call is part of the rewritten statement
        dist.Normal(0.0, sigma_b),
    )
  sigma  =  numpyro.sample("sigma", dist.HalfNormal(1.0))  \
      # a comment on the line after a continuation
  loc = (mu
         + a[row]   # row effect
         + b[col])  # column effect
  with numpyro.plate("obs", len(row)):
    numpyro.sample("y", dist.Normal(loc, sigma), obs=y)   # likelihood
  # a comment at the end of the body


# a comment between functions
def model_args():
  return (ROW, COL), {"y": Y}
# the last line is a comment without a newline